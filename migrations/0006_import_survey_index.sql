-- Every import first reads each document's bookkeeping (SqliteReader.import_candidates: key, id, source path, hash
-- and stat, revision, change, deleted_at). Without an index holding those columns that read scanned the whole
-- table, bodies included (840 MB at 100k documents), on every start that re-scans its folders. This index covers
-- the read (about 15 MB at 100k) and, led by source_path, serves every lookup documents_source served.
CREATE INDEX documents_import ON documents (source_path, id, source_hash, source_stat, revision, change, deleted_at);
DROP INDEX documents_source;
