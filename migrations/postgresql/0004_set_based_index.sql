-- The full-text index of 0002 kept a statement at a time instead of a row at a time: statement-level triggers read
-- the rows a statement changed from its transition tables and index them in a few set-based statements.
--
-- Why: the row trigger ran a PL/pgSQL function per document (six parses, four INSERTs and an UPDATE), and each
-- document's UPDATE of the one search_totals row left a row version that every later UPDATE in the transaction
-- walked past, so an import of n documents in one transaction cost O(n^2) there alone. Now an import that writes
-- many documents in one statement (COPY) updates the totals once, and a save of one document runs the same code on
-- a set of one: the index is the same whichever way a document arrives.
--
-- What is indexed, and how, is exactly 0002's (same fields, weights, term frequencies, lengths, CJK bigrams). Only
-- the word count is computed without a regular expression: sage_words leaves words separated by single spaces, so
-- a text has as many words as spaces plus one, less a leading and a trailing space (regexp_count(words, '\S+')
-- counted the same, at several times the cost).

CREATE FUNCTION sage_word_count(words TEXT) RETURNS INTEGER LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN words = '' THEN 0
    ELSE length(words) - length(replace(words, ' ', '')) + 1
        - (left(words, 1) = ' ')::integer - (right(words, 1) = ' ')::integer
END;

-- Remove documents from the index (those not in it are no-ops), and count them out of the totals.
CREATE FUNCTION sage_search_remove_all(keys BIGINT[]) RETURNS void LANGUAGE sql AS $$
    DELETE FROM search_terms WHERE doc_key = ANY(keys);
    WITH gone AS (DELETE FROM search_documents WHERE doc_key = ANY(keys) RETURNING length)
    UPDATE search_totals AS s SET documents = s.documents - g.n, tokens = s.tokens - g.words
    FROM (SELECT count(*) AS n, coalesce(sum(length), 0) AS words FROM gone) AS g
    WHERE g.n > 0;
$$;

-- The trigger's transition tables are `added` (new rows) and `removed` (old rows). An UPDATE re-indexes only the
-- rows whose indexed columns changed; the others (a later column of bookkeeping, say) leave the index alone.
CREATE FUNCTION sage_search_statement() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed BIGINT[];   -- NULL: every added row
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM sage_search_remove_all(ARRAY(SELECT o.key FROM removed AS o));
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        changed := ARRAY(
            SELECT n.key FROM added AS n JOIN removed AS o ON o.key = n.key
            WHERE (n.title, n.tags, n.triggers, n.summary, n.headings, n.body, n.cjk, n.alt_titles, n.alt_summaries,
                   n.deleted_at)
                IS DISTINCT FROM (o.title, o.tags, o.triggers, o.summary, o.headings, o.body, o.cjk, o.alt_titles,
                   o.alt_summaries, o.deleted_at)
        );
        IF cardinality(changed) = 0 THEN
            RETURN NULL;
        END IF;
        PERFORM sage_search_remove_all(changed);
    END IF;
    -- Each field is parsed once, for its term frequencies and for the weighted vector.
    WITH docs AS MATERIALIZED (
        SELECT n.key,
               ARRAY[
                   sage_words(CASE WHEN n.alt_titles = '' THEN n.title ELSE n.title || E'\n' || n.alt_titles END),
                   sage_words(n.tags),
                   sage_words(n.triggers),
                   sage_words(
                       CASE WHEN n.alt_summaries = '' THEN n.summary ELSE n.summary || E'\n' || n.alt_summaries END
                   ),
                   sage_words(n.headings),
                   sage_words(n.body)
               ] AS fields,
               array_remove(string_to_array(n.cjk, ' '), '') AS grams
        FROM added AS n
        WHERE n.deleted_at IS NULL AND (changed IS NULL OR n.key IN (SELECT unnest(changed)))
    ), parsed AS MATERIALIZED (
        SELECT d.key, d.grams,
               ARRAY(
                   SELECT to_tsvector('sage', f.text) FROM unnest(d.fields) WITH ORDINALITY AS f (text, n) ORDER BY f.n
               ) AS vectors,
               (coalesce(cardinality(d.grams), 0) + (SELECT sum(sage_word_count(f)) FROM unnest(d.fields) AS f))::integer
                   AS total
        FROM docs AS d
    ), terms AS (
        INSERT INTO search_terms (term, doc_key, field, tf)
        SELECT v.lexeme, p.key, (f.n - 1)::smallint, cardinality(v.positions)
        FROM parsed AS p, unnest(p.vectors) WITH ORDINALITY AS f (vector, n), unnest(f.vector) AS v
        UNION ALL
        SELECT g.gram, p.key, 6::smallint, count(*) FROM parsed AS p, unnest(p.grams) AS g (gram) GROUP BY p.key, g.gram
    ), indexed AS (
        INSERT INTO search_documents (doc_key, length, vector, cjk)
        SELECT p.key, p.total,
               setweight(p.vectors[1], 'A') || setweight(p.vectors[2] || p.vectors[3] || p.vectors[4], 'B')
                   || setweight(p.vectors[5], 'C') || setweight(p.vectors[6], 'D'),
               ' ' || coalesce(array_to_string(array(
                   SELECT ' ' || g.gram || ' ' FROM unnest(p.grams) WITH ORDINALITY AS g (gram, n) ORDER BY g.n
               ), ''), '') || ' '
        FROM parsed AS p
        RETURNING length
    )
    UPDATE search_totals AS s SET documents = s.documents + t.n, tokens = s.tokens + t.words
    FROM (SELECT count(*) AS n, coalesce(sum(length), 0) AS words FROM indexed) AS t
    WHERE t.n > 0;
    RETURN NULL;
END
$$;

DROP TRIGGER documents_search ON documents;
DROP FUNCTION sage_search_sync();
DROP FUNCTION sage_search_add(documents);
DROP FUNCTION sage_search_remove(BIGINT);

CREATE TRIGGER documents_search_insert AFTER INSERT ON documents
REFERENCING NEW TABLE AS added
FOR EACH STATEMENT EXECUTE FUNCTION sage_search_statement();
CREATE TRIGGER documents_search_update AFTER UPDATE ON documents
REFERENCING OLD TABLE AS removed NEW TABLE AS added
FOR EACH STATEMENT EXECUTE FUNCTION sage_search_statement();
CREATE TRIGGER documents_search_delete AFTER DELETE ON documents
REFERENCING OLD TABLE AS removed
FOR EACH STATEMENT EXECUTE FUNCTION sage_search_statement();

-- A bulk load into a small index (an import writing at least as many documents as the index holds) drops the
-- B-trees of search_terms, loads, and builds them again before it commits, sorting the terms once instead of
-- inserting each of their rows (hundreds per document) into both trees. Its transaction holds search_terms
-- exclusively meanwhile: searches elsewhere wait for that import to commit.
CREATE FUNCTION sage_search_terms_unindex() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    ALTER TABLE search_terms DROP CONSTRAINT search_terms_pkey;
    DROP INDEX search_terms_doc;
END
$$;

CREATE FUNCTION sage_search_terms_reindex() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('maintenance_work_mem', '256MB', true);   -- the sort of a 100k-document import's terms
    ALTER TABLE search_terms ADD PRIMARY KEY (term, doc_key, field) INCLUDE (tf);
    CREATE INDEX search_terms_doc ON search_terms (doc_key);
END
$$;

-- Ranking looks up the length of every matching document (98,000 for two common words at 100k documents): from
-- this index alone, without visiting search_documents' wide rows (15-30% of such a search at 100k).
CREATE INDEX search_documents_length ON search_documents (doc_key) INCLUDE (length);
