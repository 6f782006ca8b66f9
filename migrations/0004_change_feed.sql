-- A short log of which documents each generation changed, so every instance sharing the database can tell the
-- assistants watching a document (live MCP resources) what moved, not only that something did. Written in the
-- write transaction that bumps the generation; only the newest generations are kept (see store.py).

CREATE TABLE changes (
    generation INTEGER NOT NULL,
    doc_id TEXT NOT NULL,           -- '*': too many documents changed at once to name them
    layer TEXT,                     -- a layer the document is in, or was in before this change
    listed INTEGER NOT NULL         -- 1 when its entry in listings changed (title, summary, layer, live or not)
);
CREATE INDEX changes_generation ON changes (generation);
