-- The knowledge base: current documents, superseded revisions, sections, and their full-text indexes.

CREATE TABLE documents (
    key INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    layer TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',        -- JSON array of strings
    triggers TEXT NOT NULL DEFAULT '[]',    -- JSON array of strings
    summary TEXT NOT NULL DEFAULT '',
    body TEXT NOT NULL,
    headings TEXT NOT NULL DEFAULT '',      -- derived: heading texts, for the index
    cjk TEXT NOT NULL DEFAULT '',           -- derived: CJK bigrams, for the index
    source_path TEXT,                       -- the imported file, NULL when saved through the API
    source_hash TEXT,                       -- sha256 of that file when last imported
    content_hash TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    change TEXT NOT NULL,                   -- what made this revision: create, update, delete, remove, restore
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    deleted_at TEXT                         -- soft delete; NULL while live
);
CREATE INDEX documents_layer ON documents (layer, id);
CREATE INDEX documents_source ON documents (source_path);

-- Superseded revisions: the current one lives in documents.
CREATE TABLE revisions (
    doc_key INTEGER NOT NULL REFERENCES documents (key) ON DELETE CASCADE,
    revision INTEGER NOT NULL,
    change TEXT NOT NULL,
    title TEXT NOT NULL,
    layer TEXT NOT NULL,
    tags TEXT NOT NULL,
    triggers TEXT NOT NULL,
    summary TEXT NOT NULL,
    body TEXT NOT NULL,
    source_path TEXT,
    content_hash TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (doc_key, revision)
) WITHOUT ROWID;

-- Sections are slices of the current body (character offsets), cut at headings for context packing; they are
-- ranked in Python inside the few documents search has chosen, so they need no full-text index of their own.
CREATE TABLE sections (
    key INTEGER PRIMARY KEY,
    doc_key INTEGER NOT NULL REFERENCES documents (key) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    heading TEXT NOT NULL,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    UNIQUE (doc_key, ord)
);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('generation', '0');

-- The full-text index reads its text from documents (external content), so nothing is stored twice. No prefix
-- index: it cost a third of every import and served only two- and three-letter `word*` queries.
-- porter stems English, unicode61 folds case and accents; the cjk column holds bigrams (see text.py).
CREATE VIRTUAL TABLE docs_fts USING fts5 (
    title, tags, triggers, summary, headings, body, cjk,
    content = 'documents', content_rowid = 'key',
    tokenize = 'porter unicode61 remove_diacritics 2'
);
CREATE VIRTUAL TABLE docs_vocab USING fts5vocab (docs_fts, 'row');

-- Only live documents are indexed. Soft delete and restore move a row out of and back into the index.
CREATE TRIGGER documents_ai AFTER INSERT ON documents WHEN new.deleted_at IS NULL BEGIN
    INSERT INTO docs_fts (rowid, title, tags, triggers, summary, headings, body, cjk)
    VALUES (new.key, new.title, new.tags, new.triggers, new.summary, new.headings, new.body, new.cjk);
END;
CREATE TRIGGER documents_ad AFTER DELETE ON documents WHEN old.deleted_at IS NULL BEGIN
    INSERT INTO docs_fts (docs_fts, rowid, title, tags, triggers, summary, headings, body, cjk)
    VALUES ('delete', old.key, old.title, old.tags, old.triggers, old.summary, old.headings, old.body, old.cjk);
END;
-- One trigger for updates, so the old text leaves the index before the new text enters it
-- (separate triggers would fire newest first and delete the tokens just added).
CREATE TRIGGER documents_au AFTER UPDATE ON documents BEGIN
    INSERT INTO docs_fts (docs_fts, rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT 'delete', old.key, old.title, old.tags, old.triggers, old.summary, old.headings, old.body, old.cjk
    WHERE old.deleted_at IS NULL;
    INSERT INTO docs_fts (rowid, title, tags, triggers, summary, headings, body, cjk)
    SELECT new.key, new.title, new.tags, new.triggers, new.summary, new.headings, new.body, new.cjk
    WHERE new.deleted_at IS NULL;
END;

