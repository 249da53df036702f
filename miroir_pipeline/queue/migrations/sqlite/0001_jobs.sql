-- 0001_jobs: the jobs table, SQLite dialect.
--
-- Timestamps are REAL epoch seconds from the database clock, JSON columns are TEXT. The
-- migration runner applies this file inside BEGIN IMMEDIATE (one writer at a time) and
-- records it in schema_migrations, so two processes starting at once apply it once.

CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT    PRIMARY KEY NOT NULL,
    type             TEXT    NOT NULL,
    -- 'parent' rows are split into 'chunk' rows; only chunks are ever claimed.
    kind             TEXT    NOT NULL DEFAULT 'chunk'
                             CONSTRAINT jobs_kind_check CHECK (kind IN ('parent', 'chunk')),
    state            TEXT    NOT NULL DEFAULT 'queued'
                             CONSTRAINT jobs_state_check
                             CHECK (state IN ('queued', 'in_progress', 'completed', 'failed')),
    params           TEXT    NOT NULL DEFAULT '{}',
    -- Resume cursor and counters; never reset by a failure or a release.
    progress         TEXT    NOT NULL DEFAULT '{}',
    claimed_by       TEXT,
    -- Fencing token: every write after a claim must present it.
    claim_token      TEXT,
    claim_expires_at REAL,
    attempts         INTEGER NOT NULL DEFAULT 0 CONSTRAINT jobs_attempts_check CHECK (attempts >= 0),
    max_attempts     INTEGER NOT NULL DEFAULT 5 CONSTRAINT jobs_max_attempts_check CHECK (max_attempts >= 1),
    error            TEXT,
    parent_job_id    TEXT    REFERENCES jobs (id),
    chunk_index      INTEGER,
    total_chunks     INTEGER,
    -- Retry backoff: a queued row is not claimable before this instant.
    available_at     REAL    NOT NULL,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    finished_at      REAL,
    -- A lease is all-or-nothing: an in_progress chunk always has a token and an expiry.
    CONSTRAINT jobs_lease_check CHECK (
        kind = 'parent' OR state <> 'in_progress'
        OR (claim_token IS NOT NULL AND claim_expires_at IS NOT NULL)
    )
);

-- The claim walks this index in ORDER BY order (chunk_index, created_at, id); it only holds
-- claimable-or-leased chunks, so finished rows never slow a claim down.
CREATE INDEX IF NOT EXISTS jobs_claimable_idx
    ON jobs (chunk_index, created_at, id)
    WHERE kind = 'chunk' AND state IN ('queued', 'in_progress');

-- Children of a parent: split, roll-up, completion check, cancel, prune.
CREATE INDEX IF NOT EXISTS jobs_parent_job_id_idx ON jobs (parent_job_id);

-- Expired leases are found by expiry.
CREATE INDEX IF NOT EXISTS jobs_lease_expiry_idx
    ON jobs (claim_expires_at)
    WHERE state = 'in_progress';

-- list_parents: newest parents first.
CREATE INDEX IF NOT EXISTS jobs_parents_created_idx
    ON jobs (created_at DESC, id DESC)
    WHERE kind = 'parent';
