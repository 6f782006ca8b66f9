-- The PostgreSQL schema: the same tables and columns as SQLite's after its migrations 0001-0004 (JSON lists as
-- text, times as ISO-8601 text), so rows convert the same way. Ids, layers, names and times sort bytewise
-- (COLLATE "C"), as SQLite sorts them, whatever the database's locale.

CREATE TABLE meta (
    key TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('generation', '0');
INSERT INTO meta (key, value) VALUES ('database_id', md5(random()::text || clock_timestamp()::text));
INSERT INTO meta (key, value)
VALUES ('created_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00');

CREATE TABLE documents (
    key BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT COLLATE "C" NOT NULL UNIQUE,
    title TEXT NOT NULL,
    layer TEXT COLLATE "C" NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    triggers TEXT NOT NULL DEFAULT '[]',
    summary TEXT NOT NULL DEFAULT '',
    body TEXT NOT NULL,
    headings TEXT NOT NULL DEFAULT '',
    cjk TEXT NOT NULL DEFAULT '',
    related TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]',
    translations TEXT NOT NULL DEFAULT '{}',
    alt_titles TEXT NOT NULL DEFAULT '',
    alt_summaries TEXT NOT NULL DEFAULT '',
    source_path TEXT COLLATE "C",
    source_hash TEXT,
    content_hash TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    change TEXT NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    deleted_at TEXT COLLATE "C"
);
CREATE INDEX documents_layer ON documents (layer, id);
CREATE INDEX documents_source ON documents (source_path);

CREATE TABLE revisions (
    doc_key BIGINT NOT NULL REFERENCES documents (key) ON DELETE CASCADE,
    revision INTEGER NOT NULL,
    change TEXT NOT NULL,
    title TEXT NOT NULL,
    layer TEXT COLLATE "C" NOT NULL,
    tags TEXT NOT NULL,
    triggers TEXT NOT NULL,
    summary TEXT NOT NULL,
    body TEXT NOT NULL,
    related TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]',
    translations TEXT NOT NULL DEFAULT '{}',
    source_path TEXT,
    content_hash TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (doc_key, revision)
);

CREATE TABLE sections (
    key BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    doc_key BIGINT NOT NULL REFERENCES documents (key) ON DELETE CASCADE,
    ord INTEGER NOT NULL,
    heading TEXT NOT NULL,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    UNIQUE (doc_key, ord)
);

CREATE TABLE aliases (
    alias TEXT COLLATE "C" PRIMARY KEY,
    doc_key BIGINT NOT NULL REFERENCES documents (key) ON DELETE CASCADE
);
CREATE INDEX aliases_doc ON aliases (doc_key);

CREATE TABLE api_keys (
    name TEXT COLLATE "C" PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    created_at TEXT COLLATE "C" NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
);

CREATE TABLE audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TEXT COLLATE "C" NOT NULL,
    key_name TEXT NOT NULL,
    client TEXT NOT NULL,
    operation TEXT NOT NULL,
    target TEXT,
    revision INTEGER,
    outcome TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 1,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_at ON audit (at);

CREATE TABLE changes (
    generation BIGINT NOT NULL,
    doc_id TEXT NOT NULL,
    layer TEXT,
    listed BOOLEAN NOT NULL
);
CREATE INDEX changes_generation ON changes (generation);
