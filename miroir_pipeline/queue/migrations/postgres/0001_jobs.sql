-- 0001_jobs: the jobs table, Postgres dialect.
--
-- Runs with search_path set to the store's own schema (default "miroir"), because Dagster's
-- storage already has a table called "jobs"; nothing here names the schema, so one file
-- serves any configured schema. The migration runner wraps this file in a transaction that
-- holds pg_advisory_xact_lock and records it in schema_migrations.

CREATE TABLE IF NOT EXISTS jobs (
    id               text        PRIMARY KEY,
    type             text        NOT NULL,
    -- 'parent' rows are split into 'chunk' rows; only chunks are ever claimed.
    kind             text        NOT NULL DEFAULT 'chunk'
                                 CONSTRAINT jobs_kind_check CHECK (kind IN ('parent', 'chunk')),
    state            text        NOT NULL DEFAULT 'queued'
                                 CONSTRAINT jobs_state_check
                                 CHECK (state IN ('queued', 'in_progress', 'completed', 'failed')),
    params           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Resume cursor and counters; never reset by a failure or a release.
    progress         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    claimed_by       text,
    -- Fencing token: every write after a claim must present it.
    claim_token      text,
    claim_expires_at timestamptz,
    attempts         integer     NOT NULL DEFAULT 0 CONSTRAINT jobs_attempts_check CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL DEFAULT 5 CONSTRAINT jobs_max_attempts_check CHECK (max_attempts >= 1),
    error            text,
    parent_job_id    text        REFERENCES jobs (id),
    chunk_index      integer,
    total_chunks     integer,
    -- Retry backoff: a queued row is not claimable before this instant.
    available_at     timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    -- A lease is all-or-nothing: an in_progress chunk always has a token and an expiry.
    CONSTRAINT jobs_lease_check CHECK (
        kind = 'parent' OR state <> 'in_progress'
        OR (claim_token IS NOT NULL AND claim_expires_at IS NOT NULL)
    )
);

-- The claim walks this index in ORDER BY order (chunk_index, created_at, id) and stops at
-- the first claimable, unlocked row; it only holds claimable-or-leased chunks, so finished
-- rows never slow a claim down however many accumulate.
CREATE INDEX IF NOT EXISTS jobs_claimable_idx
    ON jobs (chunk_index, created_at, id)
    WHERE kind = 'chunk' AND state IN ('queued', 'in_progress');

-- Children of a parent: split, roll-up, completion check, cancel, prune.
CREATE INDEX IF NOT EXISTS jobs_parent_job_id_idx ON jobs (parent_job_id);

-- Expired leases (reclaim_expired, the out-of-attempts sweep) are found by expiry.
CREATE INDEX IF NOT EXISTS jobs_lease_expiry_idx
    ON jobs (claim_expires_at)
    WHERE state = 'in_progress';

-- list_parents: newest parents first.
CREATE INDEX IF NOT EXISTS jobs_parents_created_idx
    ON jobs (created_at DESC, id DESC)
    WHERE kind = 'parent';
