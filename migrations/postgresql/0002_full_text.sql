-- The full-text index on PostgreSQL (what SQLite's docs_fts is): kept by a trigger on documents, so every write
-- path (insert, replace, soft delete, restore, purge, bulk loads) keeps it without a line of store code.
--
-- Three parts, all of live documents only:
-- * search_terms: each document's stems with how often each occurs in each field (term frequencies). BM25 needs
--   them for every matching document, and a tsvector gives them only by unnesting it whole; a B-tree on
--   (term, doc_key, field) gives them for one term in one index range (and word prefixes in another).
-- * search_documents: a weighted tsvector (A title, B tags/triggers/summary, C headings, D body) with GIN, which
--   checks phrases word by word in order, the document's length in tokens (BM25's length normalisation), and its
--   CJK bigrams (space-padded) under a pg_trgm GIN index, which finds a run of Chinese, Japanese or Korean text.
-- * search_totals: how many documents are indexed and their tokens (BM25's N and average length).
--
-- Words are read as SQLite's `porter unicode61 remove_diacritics 2` reads them: every character that is not a
-- letter or digit separates words, accents go (unaccent), and English words are stemmed (Snowball's English
-- stemmer, Porter's successor; no stopwords are dropped, as FTS5 drops none).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        RAISE EXCEPTION 'SAGE search needs the PostgreSQL extension pg_trgm, which this server does not have: '
            'install PostgreSQL''s contrib package (e.g. postgresql-contrib) and start SAGE again';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'unaccent') THEN
        RAISE EXCEPTION 'SAGE search needs the PostgreSQL extension unaccent, which this server does not have: '
            'install PostgreSQL''s contrib package (e.g. postgresql-contrib) and start SAGE again';
    END IF;
END
$$;
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE EXTENSION IF NOT EXISTS unaccent;

CREATE TEXT SEARCH DICTIONARY sage_stem (TEMPLATE = snowball, Language = english);
CREATE TEXT SEARCH CONFIGURATION sage (PARSER = default);
ALTER TEXT SEARCH CONFIGURATION sage ADD MAPPING FOR asciiword, word, numword, int, uint WITH unaccent, sage_stem;

-- A text as words separated by single spaces (what the parser then reads as plain words and numbers).
CREATE FUNCTION sage_words(text TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN regexp_replace(text, '[^[:alnum:]]+', ' ', 'g');

CREATE TABLE search_terms (
    term TEXT COLLATE "C" NOT NULL,
    doc_key BIGINT NOT NULL,
    field SMALLINT NOT NULL,        -- 0 title, 1 tags, 2 triggers, 3 summary, 4 headings, 5 body, 6 cjk
    tf INTEGER NOT NULL,
    PRIMARY KEY (term, doc_key, field) INCLUDE (tf)    -- tf in the index: ranking reads the index alone
);
CREATE INDEX search_terms_doc ON search_terms (doc_key);

CREATE TABLE search_documents (
    doc_key BIGINT PRIMARY KEY,     -- no foreign key: the trigger removes the row, and counts it out of the totals
    length INTEGER NOT NULL,
    vector TSVECTOR NOT NULL,
    cjk TEXT NOT NULL               -- '  ab  bc  ': each bigram between two spaces, so phrases never share one
);
CREATE INDEX search_documents_vector ON search_documents USING gin (vector);
CREATE INDEX search_documents_cjk ON search_documents USING gin (cjk gin_trgm_ops);

CREATE TABLE search_totals (
    documents BIGINT NOT NULL,
    tokens BIGINT NOT NULL
);
INSERT INTO search_totals (documents, tokens) VALUES (0, 0);

-- The indexed fields of a document, as SQLite's indexed_documents view shows them.
CREATE FUNCTION sage_search_add(d documents) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    fields TEXT[] := ARRAY[
        sage_words(CASE WHEN d.alt_titles = '' THEN d.title ELSE d.title || E'\n' || d.alt_titles END),
        sage_words(d.tags),
        sage_words(d.triggers),
        sage_words(CASE WHEN d.alt_summaries = '' THEN d.summary ELSE d.summary || E'\n' || d.alt_summaries END),
        sage_words(d.headings),
        sage_words(d.body)
    ];
    grams TEXT[] := array_remove(string_to_array(d.cjk, ' '), '');
    vectors TSVECTOR[];   -- each field parsed once, for its term frequencies and for the weighted vector
    total INTEGER;
BEGIN
    vectors := ARRAY(SELECT to_tsvector('sage', f.text) FROM unnest(fields) WITH ORDINALITY AS f (text, n) ORDER BY f.n);
    total := coalesce(cardinality(grams), 0)
        + (SELECT coalesce(sum(regexp_count(f, '\S+')), 0) FROM unnest(fields) AS f);
    INSERT INTO search_terms (term, doc_key, field, tf)
    SELECT v.lexeme, d.key, (f.n - 1)::SMALLINT, cardinality(v.positions)
    FROM unnest(vectors) WITH ORDINALITY AS f (vector, n), unnest(f.vector) AS v;
    INSERT INTO search_terms (term, doc_key, field, tf)
    SELECT g, d.key, 6, count(*) FROM unnest(grams) AS g GROUP BY g;
    INSERT INTO search_documents (doc_key, length, vector, cjk)
    VALUES (
        d.key,
        total,
        setweight(vectors[1], 'A') || setweight(vectors[2] || vectors[3] || vectors[4], 'B')
            || setweight(vectors[5], 'C') || setweight(vectors[6], 'D'),
        ' ' || coalesce(array_to_string(array(SELECT ' ' || g || ' ' FROM unnest(grams) AS g), ''), '') || ' '
    );
    UPDATE search_totals SET documents = documents + 1, tokens = tokens + total;
END
$$;

CREATE FUNCTION sage_search_remove(doc BIGINT) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    gone INTEGER;
BEGIN
    DELETE FROM search_terms WHERE doc_key = doc;
    DELETE FROM search_documents WHERE doc_key = doc RETURNING length INTO gone;
    IF gone IS NOT NULL THEN
        UPDATE search_totals SET documents = documents - 1, tokens = tokens - gone;
    END IF;
END
$$;

CREATE FUNCTION sage_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM sage_search_remove(OLD.key);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.deleted_at IS NULL THEN
        PERFORM sage_search_add(NEW);
    END IF;
    RETURN NULL;
END
$$;

-- An update that changes nothing indexed (none does today) leaves the index alone.
CREATE TRIGGER documents_search
AFTER INSERT OR DELETE
OR UPDATE OF title, tags, triggers, summary, headings, body, cjk, alt_titles, alt_summaries, deleted_at
ON documents FOR EACH ROW EXECUTE FUNCTION sage_search_sync();

-- TRUNCATE fires no row trigger: emptying documents empties the index with it.
CREATE FUNCTION sage_search_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE search_terms, search_documents;
    UPDATE search_totals SET documents = 0, tokens = 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER documents_search_truncate AFTER TRUNCATE ON documents
FOR EACH STATEMENT EXECUTE FUNCTION sage_search_clear();

SELECT count(*) FROM (SELECT sage_search_add(d) FROM documents AS d WHERE d.deleted_at IS NULL) AS indexed;
