-- 0003_work_signal: wake idle workers instead of letting them poll.
--
-- An idle worker used to re-try its claim on a back-off that grew to 5 s, so a chunk queued
-- while every worker slept waited up to 5 s for its first claim, and a small import felt slow.
-- Now every change an idle worker acts on sends a NOTIFY on one channel, with the schema as
-- payload (two stores in one database have different schemas, one channel):
--   * a chunk becomes claimable: inserted by a split, handed back, retried, re-queued;
--   * a parent finishes: a worker scoped to that parent can exit at once.
-- A worker LISTENs on its own connection before its first claim and waits on it between
-- claims; expired leases send nothing, so it still claims at least once per poll interval.
-- Row-level with a WHEN clause: the claim, progress and renewal updates, the hot path, only
-- evaluate the condition. Postgres folds identical notifications of one transaction into one,
-- so a split of thousands of chunks delivers a single wake-up, at commit.
CREATE OR REPLACE FUNCTION jobs_notify_work() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('miroir_jobs_work', TG_TABLE_SCHEMA);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS jobs_notify_work ON jobs;
CREATE TRIGGER jobs_notify_work
    AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW
    WHEN ((NEW.kind = 'chunk' AND NEW.state = 'queued')
          OR (NEW.kind = 'parent' AND NEW.state IN ('completed', 'failed')))
    EXECUTE FUNCTION jobs_notify_work();
