-- Statements of the local node store (miroir_pipeline/targets/local_store.py).
-- One SQLite file per node; every index of the node lives in the same two tables.

-- name: create_indexes_table
-- One row per index: its primary-key field and its settings (JSON), as Meilisearch keeps them.
CREATE TABLE IF NOT EXISTS indexes (
    id          INTEGER PRIMARY KEY,
    uid         TEXT NOT NULL UNIQUE,
    primary_key TEXT NOT NULL,
    settings    TEXT NOT NULL DEFAULT '{}'
);

-- name: create_documents_table
-- Documents keyed by (index, primary key) so a re-sent document replaces the old one; the raw
-- JSON line is kept as sent (it already carries _miroir_shard). A rowid table: rows are ~1 KiB,
-- too big for a WITHOUT ROWID b-tree to stay fast.
CREATE TABLE IF NOT EXISTS documents (
    idx   INTEGER NOT NULL REFERENCES indexes(id),
    pk    TEXT NOT NULL,
    shard INTEGER NOT NULL,
    doc   BLOB NOT NULL,
    UNIQUE (idx, pk)
);

-- name: create_documents_shard_index
-- Backfill and verification read one shard at a time, in primary-key order.
CREATE INDEX IF NOT EXISTS documents_by_shard ON documents (idx, shard, pk);

-- name: get_index
-- Looks an index up by uid (id is the compact key used by documents).
SELECT id, primary_key, settings FROM indexes WHERE uid = ?;

-- name: insert_index
-- Creates an index unless another writer created it first (the caller re-reads afterwards).
INSERT INTO indexes (uid, primary_key, settings) VALUES (?, ?, ?) ON CONFLICT (uid) DO NOTHING;

-- name: update_index_settings
-- Replaces the stored settings of an index (the caller has merged old and new).
UPDATE indexes SET settings = ? WHERE id = ?;

-- name: upsert_documents
-- Many documents in one statement, so their rows are written in one sqlite3_step with the GIL
-- released: row by row (executemany), each row waits for the GIL again, and a writer thread
-- next to a busy router thread crawls. ?2 is a JSON array of [pk, shard, offset, length] per
-- document, ?3 the documents back to back. Rows are inserted in array order (the caller sorts
-- by key, so b-tree pages are touched in order and a key sent twice ends with its last
-- version) and streamed, with no sorter holding them. "WHERE true" lets SQLite parse ON
-- CONFLICT after a SELECT. An existing primary key is replaced in place.
INSERT INTO documents (idx, pk, shard, doc)
SELECT ?1, json_extract(m.value, '$[0]'), json_extract(m.value, '$[1]'),
       substr(?3, json_extract(m.value, '$[2]') + 1, json_extract(m.value, '$[3]'))
FROM json_each(?2) AS m
WHERE true
ON CONFLICT (idx, pk) DO UPDATE SET shard = excluded.shard, doc = excluded.doc;

-- name: fetch_shard
-- One page of a shard in primary-key order (stable while the index is not written to).
SELECT doc FROM documents WHERE idx = ? AND shard = ? ORDER BY pk LIMIT ? OFFSET ?;

-- name: iter_documents_after
-- Keyset paging over a whole index in primary-key order: cheap however deep the page.
SELECT pk, doc FROM documents WHERE idx = ? AND pk > ? ORDER BY pk LIMIT ?;

-- name: count_documents
-- Number of documents of an index.
SELECT count(*) FROM documents WHERE idx = ?;

-- name: count_by_shard
-- Documents per shard of an index (verification and progress reports).
SELECT shard, count(*) FROM documents WHERE idx = ? GROUP BY shard;

-- name: delete_document
-- Deletes one document by primary key (tests and operators).
DELETE FROM documents WHERE idx = ? AND pk = ?;

-- name: delete_index_documents
-- First half of dropping an index: its documents.
DELETE FROM documents WHERE idx = ?;

-- name: delete_index
-- Second half of dropping an index: its row.
DELETE FROM indexes WHERE id = ?;
