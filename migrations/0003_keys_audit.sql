-- Named API keys with scopes, and the audit trail.

-- A key is stored as the sha256 of its secret: the secret itself is shown once, when the key is made, and never
-- kept. Names are never reused (a revoked key stays, so the audit trail names one key with each name).
CREATE TABLE api_keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
);

-- Who changed what, when, from where, and how it went: every write, delete, restore, purge, import and key change,
-- independent of the log level. Authentication failures are counted per client, reason and minute (`count`), so a
-- flood adds one row a minute per client, not one per request.
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
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
