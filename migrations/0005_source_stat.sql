-- What an import saw of each document's source file when it last read it: size, modification and change times
-- (ns), inode, device, and a fingerprint of the settings that decide how a file is read (see ingest.file_stat).
-- A later import that finds the same values skips the file without reading it. NULL: unknown (never seen, or
-- changed too recently for its times to be trusted), so the file is read and hashed next time. Local to this
-- machine and these paths, so exports leave it out.
ALTER TABLE documents ADD COLUMN source_stat TEXT;

-- Bulk inserts index their documents in one statement (SqliteWriter.insert_many): FTS5 indexing row by row from
-- the trigger took twice the work. While the meta row 'index_later' exists (only ever inside the inserting
-- transaction, so no other connection sees it), the insert trigger leaves the index alone.
DROP TRIGGER documents_ai;
CREATE TRIGGER documents_ai AFTER INSERT ON documents
WHEN new.deleted_at IS NULL AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'index_later') BEGIN
    INSERT INTO docs_fts (rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT key, title, tags, triggers, summary, headings, body, cjk FROM indexed_documents WHERE key = new.key;
END;
