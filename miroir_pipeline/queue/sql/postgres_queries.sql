-- Named statements of the Postgres job store (miroir_pipeline/queue/postgres.py).
-- Every connection has search_path set to the store's schema, so "jobs" is <schema>.jobs.
-- Time always comes from the database clock (now()), so every worker host agrees on leases.
-- Lock order everywhere: a parent row before its chunks, parents in id order; the claim
-- only ever locks one chunk. That order is what keeps concurrent writers deadlock-free.

-- insert_job --
-- Why: a producer's row; a parent waits for split(), a standalone chunk is claimable at once.
INSERT INTO jobs (id, type, kind, state, params, max_attempts, chunk_index, total_chunks)
VALUES (%(id)s, %(type)s, %(kind)s, 'queued', %(params)s::jsonb, %(max_attempts)s,
        %(chunk_index)s, %(total_chunks)s)
RETURNING *;

-- get_job --
SELECT * FROM jobs WHERE id = %(id)s;

-- begin_snapshot --
-- Why: a parent's summary reads the parent row and then its chunks; under READ COMMITTED each
-- statement sees a newer snapshot, so the two could disagree (a completed parent whose chunks
-- are not all completed yet). The first statement of the reading transaction pins one.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- lock_job --
-- Why: take the parent's row lock before touching its chunks (split, complete, fail, cancel),
-- so that "was this the last unfinished child?" is answered after every sibling committed.
SELECT * FROM jobs WHERE id = %(id)s FOR UPDATE;

-- lock_jobs --
-- Why: several parents locked in id order, so two sweepers never deadlock on each other.
SELECT id FROM jobs WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- insert_chunks --
-- Why: one statement for all children (unnest of parallel arrays), so splitting thousands of
-- chunks is a single round trip inside the split transaction.
INSERT INTO jobs (id, type, kind, state, params, progress, max_attempts, parent_job_id,
                  chunk_index, total_chunks)
SELECT c.id, %(type)s, 'chunk', 'queued', c.params::jsonb, c.progress::jsonb, %(max_attempts)s,
       %(parent_id)s, c.chunk_index, %(total)s
FROM unnest(%(ids)s::text[], %(indexes)s::int[], %(params)s::text[], %(progresses)s::text[])
     AS c(id, chunk_index, params, progress)
RETURNING *;

-- mark_split --
-- Why: the parent leaves the queued state in the split transaction, so a second split is
-- refused; with zero chunks it is complete at once.
UPDATE jobs
SET state = %(state)s,
    total_chunks = %(total)s,
    finished_at = CASE WHEN %(finished)s THEN now() END,
    updated_at = now()
WHERE id = %(id)s
RETURNING *;

-- claim_next --
-- Why: ONE atomic statement. The CTE walks the partial index jobs_claimable_idx in
-- (chunk_index, created_at, id) order - which interleaves parents queued together (A0, B0,
-- A1, B1 ...) - and locks the first claimable row nobody else is locking (SKIP LOCKED, so
-- concurrent claimers never queue up behind each other). UPDATE ... FROM the CTE (not a bare
-- IN (subquery), which the planner may re-evaluate and so lease more than one row) then
-- leases exactly that row. Expired leases are claimable; rows out of attempts are not (they
-- are failed for good by fail_expired_exhausted). A parent_id scopes the claim to that parent's
-- chunks (the import command's own workers), in the same order and under the same backoff; NULL
-- claims across every parent.
WITH candidate AS (
    SELECT id
    FROM jobs
    WHERE kind = 'chunk'
      AND state IN ('queued', 'in_progress')
      AND type = ANY(%(types)s::text[])
      AND (%(parent_id)s::text IS NULL OR parent_job_id = %(parent_id)s::text)
      AND ((state = 'queued' AND available_at <= now())
           OR (state = 'in_progress' AND claim_expires_at < now() AND attempts < max_attempts))
    ORDER BY chunk_index, created_at, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs AS j
SET state = 'in_progress',
    claimed_by = %(worker_id)s,
    claim_token = %(token)s,
    claim_expires_at = now() + make_interval(secs => %(ttl)s),
    attempts = j.attempts + 1,
    updated_at = now()
FROM candidate
WHERE j.id = candidate.id
RETURNING j.*;

-- claim_by_id --
-- Why: a UI-launched run of one partition leases that chunk when it is queued (backoff is
-- waived: an operator asked for it now) or its lease expired; the WHERE re-check after the
-- row lock makes two racing claimers get one lease between them.
UPDATE jobs
SET state = 'in_progress',
    claimed_by = %(worker_id)s,
    claim_token = %(token)s,
    claim_expires_at = now() + make_interval(secs => %(ttl)s),
    attempts = attempts + 1,
    updated_at = now()
WHERE id = %(id)s
  AND kind = 'chunk'
  AND attempts < max_attempts
  AND (state = 'queued' OR (state = 'in_progress' AND claim_expires_at < now()))
RETURNING *;

-- renew_lease --
-- Why: fenced - only the current holder (state and token match) may extend its lease.
UPDATE jobs
SET claim_expires_at = now() + make_interval(secs => %(ttl)s), updated_at = now()
WHERE id = %(id)s AND state = 'in_progress' AND claim_token = %(token)s
RETURNING *;

-- save_progress --
-- Why: fenced - a worker that lost its lease must not move the resume cursor.
UPDATE jobs
SET progress = %(progress)s::jsonb, updated_at = now()
WHERE id = %(id)s AND state = 'in_progress' AND claim_token = %(token)s
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
    progress = COALESCE(%(progress)s::jsonb, progress),
    claim_token = NULL,
    claim_expires_at = NULL,
    error = NULL,
    finished_at = now(),
    updated_at = now()
WHERE id = %(id)s AND state = 'in_progress' AND claim_token = %(token)s
RETURNING progress, finished_at, updated_at;

-- unfinished_child --
-- Why: run right after a chunk's completion commits, in its own statement, so the parent row
-- is never held across a chunk's transaction: any unfinished sibling (READ COMMITTED: a fresh
-- snapshot, so of two last chunks the one that commits second sees none) means this was not
-- the last, and nothing is locked. Only when none is left does the completion take the
-- parent's lock and run complete_parent_if_done. Same LIMIT 1 walk as below.
SELECT c.id FROM jobs AS c
WHERE c.parent_job_id = %(id)s AND c.state <> 'completed'
LIMIT 1;

-- complete_parent_if_done --
-- Why: run with the parent's row lock already held (lock_job, earlier in the transaction), so
-- its snapshot is taken after whatever held the lock committed. Checked under the lock taken in
-- the same statement instead, a snapshot taken before a requeue committed would still see the
-- re-queued chunk completed: the requeue only locks an in-progress parent, and a row that was
-- locked but not changed is not re-checked, so the parent would complete with a chunk queued.
-- Of two last chunks completing at once, the second to get the lock sees p.state completed.
-- The check is a LIMIT 1 subquery, not NOT EXISTS, so the planner walks
-- jobs_unfinished_children_idx with a plain index scan and stops at the first unfinished
-- sibling. A completed chunk's entry stays in that partial index until VACUUM; a plain scan
-- marks such entries dead as it passes them, so each is read about once. The anti-join the
-- planner chose for NOT EXISTS used a bitmap scan, which never marks them: it read every
-- completed sibling's entry on every completion (O(n^2) per parent between vacuums; 9,687
-- entries per check halfway through a 10,000-chunk parent: a claimed chunk leaves one too).
UPDATE jobs AS p
SET state = 'completed', finished_at = now(), updated_at = now()
WHERE p.id = %(id)s
  AND p.state = 'in_progress'
  AND (SELECT c.id FROM jobs AS c
       WHERE c.parent_job_id = p.id AND c.state <> 'completed'
       LIMIT 1) IS NULL
RETURNING *;

-- finished_parent_candidates --
-- Why: the repair sweep for a worker that died between committing its parent's last chunk and
-- completing the parent. Only split parents (total_chunks set) qualify, and only through the
-- partial index of unfinished children (the same LIMIT 1 check as complete_parent_if_done, for
-- the same reason), so the sweep stays cheap. Nothing is locked: each candidate is then locked
-- and checked again by complete_parent_if_done, which a requeue racing the sweep cannot fool.
SELECT p.id
FROM jobs AS p
WHERE p.kind = 'parent'
  AND p.state = 'in_progress'
  AND p.total_chunks IS NOT NULL
  AND (SELECT c.id FROM jobs AS c
       WHERE c.parent_job_id = p.id AND c.state <> 'completed'
       LIMIT 1) IS NULL
ORDER BY p.id;

-- fail_chunk --
-- Why: fenced; one statement decides retry (queued, lease cleared, not claimable before the
-- backoff) or failure for good. Progress is never touched: the next attempt resumes from it.
UPDATE jobs
SET state = CASE WHEN %(retry)s THEN 'queued' ELSE 'failed' END,
    error = %(error)s,
    claimed_by = CASE WHEN %(retry)s THEN NULL ELSE claimed_by END,
    claim_token = NULL,
    claim_expires_at = NULL,
    available_at = CASE WHEN %(retry)s THEN now() + make_interval(secs => %(backoff)s)
                        ELSE available_at END,
    finished_at = CASE WHEN %(retry)s THEN NULL ELSE now() END,
    updated_at = now()
WHERE id = %(id)s AND state = 'in_progress' AND claim_token = %(token)s
RETURNING *;

-- release_chunk --
-- Why: a graceful hand-back is not a failed attempt, so the attempt the claim counted is
-- given back; the row is claimable again at once with its progress.
UPDATE jobs
SET state = 'queued',
    claimed_by = NULL,
    claim_token = NULL,
    claim_expires_at = NULL,
    attempts = GREATEST(attempts - 1, 0),
    available_at = now(),
    updated_at = now()
WHERE id = %(id)s AND state = 'in_progress' AND claim_token = %(token)s
RETURNING *;

-- fail_unfinished --
-- Why: fail one parent or chunk for good (child failed for good, cancel); finished rows are
-- left alone and clearing the token fences any live holder.
UPDATE jobs
SET state = 'failed',
    error = %(error)s,
    claim_token = NULL,
    claim_expires_at = NULL,
    finished_at = now(),
    updated_at = now()
WHERE id = %(id)s AND state IN ('queued', 'in_progress')
RETURNING *;

-- fail_unfinished_children --
-- Why: cancel fails every chunk that has not finished, fencing live leases. The rows are
-- locked in id order first: a multi-row UPDATE locks in whatever order its plan scans, and
-- the lease sweep (requeue_expired) locking the same chunks in another order would deadlock.
WITH locked AS (
    SELECT id FROM jobs
    WHERE parent_job_id = %(id)s AND state IN ('queued', 'in_progress')
    ORDER BY id
    FOR UPDATE
)
UPDATE jobs
SET state = 'failed',
    error = %(error)s,
    claim_token = NULL,
    claim_expires_at = NULL,
    finished_at = now(),
    updated_at = now()
FROM locked
WHERE jobs.id = locked.id AND jobs.state IN ('queued', 'in_progress');

-- expired_exhausted --
-- Why: chunks whose worker died on their last allowed attempt; found without locks first so
-- their parents can be locked before them (the global lock order).
SELECT id, parent_job_id
FROM jobs
WHERE state = 'in_progress' AND kind = 'chunk'
  AND claim_expires_at < now() AND attempts >= max_attempts;

-- fail_expired_exhausted --
-- Why: the same conditions re-checked under the row lock (a holder may have renewed since).
UPDATE jobs
SET state = 'failed',
    error = 'lease expired on the last allowed attempt (' || attempts || '/' || max_attempts
            || ', worker ' || COALESCE(claimed_by, '?') || ')'
            || COALESCE('; previous error: ' || error, ''),
    claim_token = NULL,
    claim_expires_at = NULL,
    finished_at = now(),
    updated_at = now()
WHERE id = ANY(%(ids)s)
  AND state = 'in_progress' AND claim_expires_at < now() AND attempts >= max_attempts
RETURNING id, parent_job_id, error;

-- requeue_expired --
-- Why: a crashed worker's chunk goes back to the queue with its progress and its attempt
-- count (the crashed attempt counts), so the next claimer resumes at the cursor. Locked in id
-- order first, as fail_unfinished_children does, so a sweep and a cancel never deadlock; the
-- conditions are checked again on the locked row (a holder may have renewed meanwhile).
WITH locked AS (
    SELECT id FROM jobs
    WHERE state = 'in_progress' AND kind = 'chunk'
      AND claim_expires_at < now() AND attempts < max_attempts
    ORDER BY id
    FOR UPDATE
)
UPDATE jobs
SET state = 'queued',
    claimed_by = NULL,
    claim_token = NULL,
    claim_expires_at = NULL,
    available_at = now(),
    updated_at = now()
FROM locked
WHERE jobs.id = locked.id
  AND jobs.state = 'in_progress' AND jobs.claim_expires_at < now()
  AND jobs.attempts < jobs.max_attempts;

-- queue_depth --
-- Why: what the HPA scales on - the rows a claim could take right now, expired leases
-- included (their workers are gone), per type.
SELECT type, count(*) AS depth
FROM jobs
WHERE kind = 'chunk'
  AND state IN ('queued', 'in_progress')
  AND ((state = 'queued' AND available_at <= now())
       OR (state = 'in_progress' AND claim_expires_at < now() AND attempts < max_attempts))
GROUP BY type;

-- children --
SELECT * FROM jobs WHERE parent_job_id = %(id)s ORDER BY chunk_index, id;

-- children_states --
-- Why: one query for the roll-up of many parents (list_parents), not one per parent.
SELECT parent_job_id, state, progress FROM jobs WHERE parent_job_id = ANY(%(ids)s);

-- list_parents --
SELECT *
FROM jobs
WHERE kind = 'parent' AND (%(type)s::text IS NULL OR type = %(type)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- finished_parents --
-- Why: what the parent-report sensor records, in finish order from its cursor (epoch seconds,
-- with a microsecond of slack each way for the float round trip). Keyset paging on
-- (finished_at, id): rows finished at the cursor's instant come after its id, so a page of
-- parents that all finished at the same instant never repeats forever.
-- Parents only (the partial index of parents keeps it off the chunk rows); pruning bounds
-- their number.
SELECT *
FROM jobs
WHERE kind = 'parent'
  AND state IN ('completed', 'failed')
  AND (%(since)s::double precision IS NULL
       OR finished_at > to_timestamp(%(since)s::double precision + 0.000001)
       OR (finished_at >= to_timestamp(%(since)s::double precision - 0.000001) AND id > %(after_id)s))
ORDER BY finished_at, id
LIMIT %(limit)s;

-- param_values --
-- Why: a file named in job params (a staged dump copy) is deleted by prune only when no row
-- names it any more. One scan of the table: prune is occasional, and no index serves params.
SELECT DISTINCT params ->> %(key)s AS value
FROM jobs
WHERE jsonb_typeof(params -> %(key)s) = 'string';

-- prunable_parents --
-- Why: finished parents past the age whose chunks are all finished too (a failed parent's
-- siblings may still be running; they are pruned once they finish). Locked so nothing
-- changes them while their rows are deleted.
SELECT p.id
FROM jobs AS p
WHERE p.kind = 'parent'
  AND p.state IN ('completed', 'failed')
  AND p.finished_at < now() - make_interval(secs => %(age)s)
  AND NOT EXISTS (SELECT 1 FROM jobs AS c
                  WHERE c.parent_job_id = p.id AND c.state IN ('queued', 'in_progress'))
ORDER BY p.id
FOR UPDATE;

-- delete_children --
-- Why: the ids come back so the caller can remove the chunks' Dagster partitions too.
DELETE FROM jobs WHERE parent_job_id = ANY(%(ids)s)
RETURNING id, type;

-- delete_jobs --
DELETE FROM jobs WHERE id = ANY(%(ids)s)
RETURNING id, type;

-- delete_finished_orphans --
-- Why: standalone chunks (no parent) are pruned by their own finish time.
DELETE FROM jobs
WHERE kind = 'chunk' AND parent_job_id IS NULL
  AND state IN ('completed', 'failed')
  AND finished_at < now() - make_interval(secs => %(age)s)
RETURNING id, type;

-- migration_lock --
-- Why: serialises migrators across processes and hosts for the rest of the transaction;
-- the key is derived from the schema name, so stores in different schemas do not wait.
SELECT pg_advisory_xact_lock(%(key)s::bigint);

-- create_schema_migrations --
-- Why: the record of applied migration files, in the store's own schema.
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- applied_migrations --
SELECT name FROM schema_migrations ORDER BY name;

-- record_migration --
INSERT INTO schema_migrations (name) VALUES (%(name)s);

-- create_schema --
-- Why: the store lives in its own schema (Dagster already has a "jobs" table); the name is
-- a validated identifier composed in with psycopg.sql.Identifier, never string-pasted.
CREATE SCHEMA IF NOT EXISTS {schema};

-- set_search_path --
-- Why: every connection resolves "jobs" and "schema_migrations" to the store's schema, so
-- neither the queries nor the migration files name it.
SET search_path TO {schema};

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
    progress = CASE WHEN %(reset)s THEN '{}'::jsonb ELSE progress END,
    available_at = now(),
    finished_at = NULL,
    updated_at = now()
WHERE id = %(id)s AND kind = 'chunk' AND state IN ('completed', 'failed')
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
    updated_at = now()
WHERE id = %(id)s AND state IN ('completed', 'failed')
  AND NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_job_id = %(id)s AND c.state = 'failed')
RETURNING *;

-- claimable_chunks --
-- Why: what the next claims would take, without leasing anything (the dispatch sensor launches
-- one run per row). Same predicate and order as claim_next, so it also walks jobs_claimable_idx.
SELECT *
FROM jobs
WHERE kind = 'chunk'
  AND state IN ('queued', 'in_progress')
  AND type = ANY(%(types)s::text[])
  AND ((state = 'queued' AND available_at <= now())
       OR (state = 'in_progress' AND claim_expires_at < now() AND attempts < max_attempts))
ORDER BY chunk_index, created_at, id
LIMIT %(limit)s;

-- listen_work --
-- Why: an idle worker waits on this channel instead of polling its claim. The trigger of
-- migration 0003 notifies it, with the schema as payload, whenever a chunk becomes claimable
-- or a parent finishes; the listener ignores other schemas' notifications.
LISTEN miroir_jobs_work;
