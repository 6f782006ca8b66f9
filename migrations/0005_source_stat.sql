-- What an import saw of each document's source file when it last read it: size, modification and change times
-- (ns), inode, device, and a fingerprint of the settings that decide how a file is read (see ingest.file_stat).
-- A later import that finds the same values skips the file without reading it. NULL: unknown (never seen, or
-- changed too recently for its times to be trusted), so the file is read and hashed next time. Local to this
-- machine and these paths, so exports leave it out.
ALTER TABLE documents ADD COLUMN source_stat TEXT;
