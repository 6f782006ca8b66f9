-- The database's identity, links between documents, translations, and an index of exactly the live documents.

-- A random identity for this database, which every cache key carries (so no cache entry can answer for another
-- database, or for this one before a restore, which gives it a new identity), and when it was created.
INSERT INTO meta (key, value) VALUES ('database_id', lower(hex(randomblob(16))));
INSERT INTO meta (key, value)
SELECT 'created_at', coalesce((SELECT min(created_at) FROM documents), strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'));

-- Frontmatter that names other documents (JSON arrays of ids) and translated titles and summaries
-- (JSON: {"zh": {"title": ..., "summary": ...}}). alt_titles and alt_summaries are derived, for the index.
ALTER TABLE documents ADD COLUMN related TEXT NOT NULL DEFAULT '[]';
ALTER TABLE documents ADD COLUMN aliases TEXT NOT NULL DEFAULT '[]';
ALTER TABLE documents ADD COLUMN translations TEXT NOT NULL DEFAULT '{}';
ALTER TABLE documents ADD COLUMN alt_titles TEXT NOT NULL DEFAULT '';
ALTER TABLE documents ADD COLUMN alt_summaries TEXT NOT NULL DEFAULT '';
ALTER TABLE revisions ADD COLUMN related TEXT NOT NULL DEFAULT '[]';
ALTER TABLE revisions ADD COLUMN aliases TEXT NOT NULL DEFAULT '[]';
ALTER TABLE revisions ADD COLUMN translations TEXT NOT NULL DEFAULT '{}';

-- An alias is the id of a document merged into another; reading it reads the one that absorbed it.
CREATE TABLE aliases (
    alias TEXT PRIMARY KEY,
    doc_key INTEGER NOT NULL REFERENCES documents (key) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX aliases_doc ON aliases (doc_key);

-- The index reads its text from a view of the live documents. FTS5's own integrity check ('integrity-check', rank
-- 1) then compares the index with exactly what should be in it; with the table itself as content it also expected
-- the soft-deleted rows, which are deliberately not indexed, and every backup after a delete failed verification.
-- Every trigger reads the indexed text from this one view, so the index and its check cannot disagree.
DROP TRIGGER documents_ai;
DROP TRIGGER documents_ad;
DROP TRIGGER documents_au;
DROP TABLE docs_vocab;
DROP TABLE docs_fts;

CREATE VIEW indexed_documents AS
SELECT key,
       CASE WHEN alt_titles = '' THEN title ELSE title || char(10) || alt_titles END AS title,
       tags,
       triggers,
       CASE WHEN alt_summaries = '' THEN summary ELSE summary || char(10) || alt_summaries END AS summary,
       headings,
       body,
       cjk
FROM documents
WHERE deleted_at IS NULL;

CREATE VIRTUAL TABLE docs_fts USING fts5 (
    title, tags, triggers, summary, headings, body, cjk,
    content = 'indexed_documents', content_rowid = 'key',
    tokenize = 'porter unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE docs_vocab USING fts5vocab (docs_fts, 'row');
INSERT INTO docs_fts (docs_fts) VALUES ('rebuild');

CREATE TRIGGER documents_ai AFTER INSERT ON documents WHEN new.deleted_at IS NULL BEGIN
    INSERT INTO docs_fts (rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT key, title, tags, triggers, summary, headings, body, cjk FROM indexed_documents WHERE key = new.key;
END;
-- The old text leaves the index before the row changes (while the view still shows it), the new text enters after;
-- an update that changes nothing indexed (none does today) leaves the index alone.
CREATE TRIGGER documents_bd BEFORE DELETE ON documents WHEN old.deleted_at IS NULL BEGIN
    INSERT INTO docs_fts (docs_fts, rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT 'delete', key, title, tags, triggers, summary, headings, body, cjk
    FROM indexed_documents WHERE key = old.key;
END;
CREATE TRIGGER documents_bu
BEFORE UPDATE OF title, tags, triggers, summary, headings, body, cjk, alt_titles, alt_summaries, deleted_at
ON documents WHEN old.deleted_at IS NULL BEGIN
    INSERT INTO docs_fts (docs_fts, rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT 'delete', key, title, tags, triggers, summary, headings, body, cjk
    FROM indexed_documents WHERE key = old.key;
END;
CREATE TRIGGER documents_au
AFTER UPDATE OF title, tags, triggers, summary, headings, body, cjk, alt_titles, alt_summaries, deleted_at
ON documents WHEN new.deleted_at IS NULL BEGIN
    INSERT INTO docs_fts (rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT key, title, tags, triggers, summary, headings, body, cjk FROM indexed_documents WHERE key = new.key;
END;
