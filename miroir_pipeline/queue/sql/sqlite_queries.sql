-- Named statements of the SQLite job store (miroir_pipeline/queue/sqlite.py).
-- Every write runs inside BEGIN IMMEDIATE: SQLite has one writer at a time, so each
-- transaction below is atomic against every other process using the same file.
-- Time is the database clock as epoch seconds: ((julianday('now') - 2440587.5) * 86400.0),
-- constant within one statement. Lists are passed as JSON arrays and read with json_each.

-- insert_job --
-- Why: a producer's row; a parent waits for split(), a standalone chunk is claimable at once.
INSERT INTO jobs (id, type, kind, state, params, progress, max_attempts, chunk_index,
                  total_chunks, available_at, created_at, updated_at)
VALUES (:id, :type, :kind, 'queued', :params, '{}', :max_attempts, :chunk_index, :total_chunks,
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0)
RETURNING *;

-- get_job --
SELECT * FROM jobs WHERE id = :id;

-- insert_chunk --
-- Why: run with executemany inside the split transaction; all children appear at once.
INSERT INTO jobs (id, type, kind, state, params, progress, max_attempts, parent_job_id,
                  chunk_index, total_chunks, available_at, created_at, updated_at)
VALUES (:id, :type, 'chunk', 'queued', :params, :progress, :max_attempts, :parent_id,
        :chunk_index, :total,
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0,
        (julianday('now') - 2440587.5) * 86400.0);

-- mark_split --
-- Why: the parent leaves the queued state in the split transaction, so a second split is
-- refused; with zero chunks it is complete at once.
UPDATE jobs
SET state = :state,
    total_chunks = :total,
    finished_at = CASE WHEN :finished THEN (julianday('now') - 2440587.5) * 86400.0 END,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id
RETURNING *;

-- claim_next --
-- Why: one statement in a BEGIN IMMEDIATE transaction: the oldest claimable chunk in
-- (chunk_index, created_at, id) order - interleaving parents queued together - is leased.
-- The sub-select walks jobs_claimable_idx. Expired leases are claimable; rows out of
-- attempts are not (fail_expired_exhausted fails them for good). A parent_id scopes the claim
-- to that parent's chunks (the import command's own workers); NULL claims across every parent.
UPDATE jobs
SET state = 'in_progress',
    claimed_by = :worker_id,
    claim_token = :token,
    claim_expires_at = (julianday('now') - 2440587.5) * 86400.0 + :ttl,
    attempts = attempts + 1,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = (
    SELECT id
    FROM jobs
    WHERE kind = 'chunk'
      AND state IN ('queued', 'in_progress')
      AND type IN (SELECT value FROM json_each(:types))
      AND (:parent_id IS NULL OR parent_job_id = :parent_id)
      AND ((state = 'queued' AND available_at <= (julianday('now') - 2440587.5) * 86400.0)
           OR (state = 'in_progress'
               AND claim_expires_at < (julianday('now') - 2440587.5) * 86400.0
               AND attempts < max_attempts))
    ORDER BY chunk_index, created_at, id
    LIMIT 1
)
RETURNING *;

-- claim_by_id --
-- Why: a UI-launched run of one partition leases that chunk when it is queued (backoff is
-- waived: an operator asked for it now) or its lease expired.
UPDATE jobs
SET state = 'in_progress',
    claimed_by = :worker_id,
    claim_token = :token,
    claim_expires_at = (julianday('now') - 2440587.5) * 86400.0 + :ttl,
    attempts = attempts + 1,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id
  AND kind = 'chunk'
  AND attempts < max_attempts
  AND (state = 'queued'
       OR (state = 'in_progress'
           AND claim_expires_at < (julianday('now') - 2440587.5) * 86400.0))
RETURNING *;

-- renew_lease --
-- Why: fenced - only the current holder (state and token match) may extend its lease.
UPDATE jobs
SET claim_expires_at = (julianday('now') - 2440587.5) * 86400.0 + :ttl,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state = 'in_progress' AND claim_token = :token
RETURNING *;

-- save_progress --
-- Why: fenced - a worker that lost its lease must not move the resume cursor.
UPDATE jobs
SET progress = :progress, updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state = 'in_progress' AND claim_token = :token
RETURNING id;

-- complete_chunk --
-- Why: fenced; keeps claimed_by as a record of who finished it, drops the lease. Returns only
-- what it may change that the caller cannot know: the lease holds the rest of the row. A
-- token that still matches means the row was written since the claim only through this lease
-- (renewals and progress, returned here); a cancel or requeue clears the token and the fence
-- fails. The whole row cost 8-20 % of a claim + complete cycle on Postgres
-- (benchmarks/claim_throughput.py --breakdown).
UPDATE jobs
SET state = 'completed',
    progress = COALESCE(:progress, progress),
    claim_token = NULL,
    claim_expires_at = NULL,
    error = NULL,
    finished_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state = 'in_progress' AND claim_token = :token
RETURNING progress, finished_at, updated_at;

-- complete_parent_if_done --
-- Why: in the same transaction as the child's completion: the last child completes the parent.
UPDATE jobs
SET state = 'completed',
    finished_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id
  AND state = 'in_progress'
  AND NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_job_id = :id AND c.state <> 'completed')
RETURNING *;

-- complete_finished_parents --
-- Why: the repair sweep (kept for parity with Postgres, where a worker can die between a
-- chunk's commit and its parent check; here the check runs in the chunk's own transaction).
UPDATE jobs
SET state = 'completed',
    finished_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE kind = 'parent'
  AND state = 'in_progress'
  AND total_chunks IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_job_id = jobs.id AND c.state <> 'completed')
RETURNING *;

-- fail_chunk --
-- Why: fenced; one statement decides retry (queued, lease cleared, not claimable before the
-- backoff) or failure for good. Progress is never touched: the next attempt resumes from it.
UPDATE jobs
SET state = CASE WHEN :retry THEN 'queued' ELSE 'failed' END,
    error = :error,
    claimed_by = CASE WHEN :retry THEN NULL ELSE claimed_by END,
    claim_token = NULL,
    claim_expires_at = NULL,
    available_at = CASE WHEN :retry THEN (julianday('now') - 2440587.5) * 86400.0 + :backoff
                        ELSE available_at END,
    finished_at = CASE WHEN :retry THEN NULL ELSE (julianday('now') - 2440587.5) * 86400.0 END,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state = 'in_progress' AND claim_token = :token
RETURNING *;

-- release_chunk --
-- Why: a graceful hand-back is not a failed attempt, so the attempt the claim counted is
-- given back; the row is claimable again at once with its progress.
UPDATE jobs
SET state = 'queued',
    claimed_by = NULL,
    claim_token = NULL,
    claim_expires_at = NULL,
    attempts = MAX(attempts - 1, 0),
    available_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state = 'in_progress' AND claim_token = :token
RETURNING *;

-- fail_unfinished --
-- Why: fail one parent or chunk for good (child failed for good, cancel); finished rows are
-- left alone and clearing the token fences any live holder.
UPDATE jobs
SET state = 'failed',
    error = :error,
    claim_token = NULL,
    claim_expires_at = NULL,
    finished_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state IN ('queued', 'in_progress')
RETURNING *;

-- fail_unfinished_children --
-- Why: cancel fails every chunk that has not finished, fencing live leases.
UPDATE jobs
SET state = 'failed',
    error = :error,
    claim_token = NULL,
    claim_expires_at = NULL,
    finished_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE parent_job_id = :id AND state IN ('queued', 'in_progress');

-- fail_expired_exhausted --
-- Why: chunks whose worker died on their last allowed attempt can never be claimed again,
-- so they fail for good (their parents are failed by the caller in the same transaction).
UPDATE jobs
SET state = 'failed',
    error = 'lease expired on the last allowed attempt (' || attempts || '/' || max_attempts
            || ', worker ' || COALESCE(claimed_by, '?') || ')'
            || COALESCE('; previous error: ' || error, ''),
    claim_token = NULL,
    claim_expires_at = NULL,
    finished_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE state = 'in_progress' AND kind = 'chunk'
  AND claim_expires_at < (julianday('now') - 2440587.5) * 86400.0
  AND attempts >= max_attempts
RETURNING id, parent_job_id, error;

-- requeue_expired --
-- Why: a crashed worker's chunk goes back to the queue with its progress and its attempt
-- count (the crashed attempt counts), so the next claimer resumes at the cursor.
UPDATE jobs
SET state = 'queued',
    claimed_by = NULL,
    claim_token = NULL,
    claim_expires_at = NULL,
    available_at = (julianday('now') - 2440587.5) * 86400.0,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE state = 'in_progress' AND kind = 'chunk'
  AND claim_expires_at < (julianday('now') - 2440587.5) * 86400.0
  AND attempts < max_attempts;

-- queue_depth --
-- Why: what the HPA scales on - the rows a claim could take right now, expired leases
-- included (their workers are gone), per type.
SELECT type, count(*) AS depth
FROM jobs
WHERE kind = 'chunk'
  AND state IN ('queued', 'in_progress')
  AND ((state = 'queued' AND available_at <= (julianday('now') - 2440587.5) * 86400.0)
       OR (state = 'in_progress'
           AND claim_expires_at < (julianday('now') - 2440587.5) * 86400.0
           AND attempts < max_attempts))
GROUP BY type;

-- children --
SELECT * FROM jobs WHERE parent_job_id = :id ORDER BY chunk_index, id;

-- children_states --
-- Why: one query for the roll-up of many parents (list_parents), not one per parent.
SELECT parent_job_id, state, progress
FROM jobs
WHERE parent_job_id IN (SELECT value FROM json_each(:ids));

-- list_parents --
SELECT *
FROM jobs
WHERE kind = 'parent' AND (:type IS NULL OR type = :type)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- finished_parents --
-- Why: what the parent-report sensor records, in finish order from its cursor (epoch seconds,
-- with a microsecond of slack each way for the float round trip). Keyset paging on
-- (finished_at, id): rows finished at the cursor's instant come after its id, so a page of
-- parents that all finished at the same instant never repeats forever. Parents only (the
-- partial index of parents keeps it off the chunk rows); pruning bounds their number.
SELECT *
FROM jobs
WHERE kind = 'parent'
  AND state IN ('completed', 'failed')
  AND (:since IS NULL
       OR finished_at > :since + 0.000001
       OR (finished_at >= :since - 0.000001 AND id > :after_id))
ORDER BY finished_at, id
LIMIT :limit;

-- param_values --
-- Why: a file named in job params (a staged dump copy) is deleted by prune only when no row
-- names it any more. One scan of the table: prune is occasional, and no index serves params.
-- :path is the JSON path of the key ('$.data_uri').
SELECT DISTINCT json_extract(params, :path) AS value
FROM jobs
WHERE json_type(params, :path) = 'text';

-- prunable_parents --
-- Why: finished parents past the age whose chunks are all finished too (a failed parent's
-- siblings may still be running; they are pruned once they finish).
SELECT p.id
FROM jobs AS p
WHERE p.kind = 'parent'
  AND p.state IN ('completed', 'failed')
  AND p.finished_at < (julianday('now') - 2440587.5) * 86400.0 - :age
  AND NOT EXISTS (SELECT 1 FROM jobs AS c
                  WHERE c.parent_job_id = p.id AND c.state IN ('queued', 'in_progress'))
ORDER BY p.id;

-- delete_children --
-- Why: the ids come back so the caller can remove the chunks' Dagster partitions too.
DELETE FROM jobs WHERE parent_job_id IN (SELECT value FROM json_each(:ids))
RETURNING id, type;

-- delete_jobs --
DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(:ids))
RETURNING id, type;

-- delete_finished_orphans --
-- Why: standalone chunks (no parent) are pruned by their own finish time.
DELETE FROM jobs
WHERE kind = 'chunk' AND parent_job_id IS NULL
  AND state IN ('completed', 'failed')
  AND finished_at < (julianday('now') - 2440587.5) * 86400.0 - :age
RETURNING id, type;

-- create_schema_migrations --
-- Why: the record of applied migration files; created before anything else, inside the
-- migrating BEGIN IMMEDIATE transaction.
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       TEXT PRIMARY KEY NOT NULL,
    applied_at REAL NOT NULL
);

-- applied_migrations --
SELECT name FROM schema_migrations ORDER BY name;

-- record_migration --
INSERT INTO schema_migrations (name, applied_at)
VALUES (:name, (julianday('now') - 2440587.5) * 86400.0);

-- requeue_chunk --
-- Why: an operator re-runs a finished chunk (retry after a failure for good, or a re-import):
-- a fresh attempt budget, no lease, claimable at once; progress is kept for a retry (it resumes
-- at the cursor) and cleared for a re-import (it starts over).
UPDATE jobs
SET state = 'queued',
    claimed_by = NULL,
    claim_token = NULL,
    claim_expires_at = NULL,
    attempts = 0,
    error = NULL,
    progress = CASE WHEN :reset THEN '{}' ELSE progress END,
    available_at = (julianday('now') - 2440587.5) * 86400.0,
    finished_at = NULL,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND kind = 'chunk' AND state IN ('completed', 'failed')
RETURNING *;

-- reopen_parent --
-- Why: a parent whose chunk is re-queued is unfinished again; it completes or fails anew with
-- its children (same transaction as requeue_chunk). Not while another child is still failed
-- for good: nothing would ever complete or fail the parent again, so it stays failed until
-- its last failed chunk is re-queued too (re-queued chunks run meanwhile all the same).
UPDATE jobs
SET state = 'in_progress',
    error = NULL,
    finished_at = NULL,
    updated_at = (julianday('now') - 2440587.5) * 86400.0
WHERE id = :id AND state IN ('completed', 'failed')
  AND NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_job_id = :id AND c.state = 'failed')
RETURNING *;

-- claimable_chunks --
-- Why: what the next claims would take, without leasing anything (the dispatch sensor launches
-- one run per row). Same predicate and order as claim_next, so it also walks jobs_claimable_idx.
SELECT *
FROM jobs
WHERE kind = 'chunk'
  AND state IN ('queued', 'in_progress')
  AND type IN (SELECT value FROM json_each(:types))
  AND ((state = 'queued' AND available_at <= (julianday('now') - 2440587.5) * 86400.0)
       OR (state = 'in_progress'
           AND claim_expires_at < (julianday('now') - 2440587.5) * 86400.0
           AND attempts < max_attempts))
ORDER BY chunk_index, created_at, id
LIMIT :limit;

-- work_signal --
-- Why: what an idle worker polls instead of its claim. Triggers (migration 0003) bump the
-- counter whenever a chunk becomes claimable or a parent finishes; reading one row never waits
-- for the writer in WAL mode, where a claim that finds nothing still takes the write lock.
SELECT seq FROM jobs_work_signal WHERE id = 1;
