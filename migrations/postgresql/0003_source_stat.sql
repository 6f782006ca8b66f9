-- What an import saw of each document's source file when it last read it (see the SQLite migration
-- 0005_source_stat.sql): a later import that finds the same size, times, inode and device skips the file unread.
ALTER TABLE documents ADD COLUMN source_stat TEXT;
