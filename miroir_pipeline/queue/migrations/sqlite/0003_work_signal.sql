-- 0003_work_signal: wake idle workers instead of letting them poll the claim.
--
-- An idle worker used to re-try its claim on a back-off that grew to 5 s, so a chunk queued
-- while every worker slept waited up to 5 s for its first claim, and a small import felt slow.
-- SQLite has no NOTIFY, so every change an idle worker acts on bumps one counter:
--   * a chunk becomes claimable: inserted by a split, handed back, retried, re-queued;
--   * a parent finishes: a worker scoped to that parent can exit at once.
-- An idle worker reads the counter every few tens of milliseconds: a read of one row in WAL
-- mode, which never waits for the writer, where a claim is a write that takes the file's
-- write lock. Expired leases bump nothing, so a worker still claims once per poll interval.
CREATE TABLE IF NOT EXISTS jobs_work_signal (
    id  INTEGER PRIMARY KEY CONSTRAINT jobs_work_signal_one_row CHECK (id = 1),
    seq INTEGER NOT NULL
);

INSERT OR IGNORE INTO jobs_work_signal (id, seq) VALUES (1, 0);

CREATE TRIGGER IF NOT EXISTS jobs_work_signal_insert
    AFTER INSERT ON jobs
    WHEN NEW.kind = 'chunk' AND NEW.state = 'queued'
BEGIN
    UPDATE jobs_work_signal SET seq = seq + 1 WHERE id = 1;
END;

CREATE TRIGGER IF NOT EXISTS jobs_work_signal_update
    AFTER UPDATE OF state ON jobs
    WHEN (NEW.kind = 'chunk' AND NEW.state = 'queued')
      OR (NEW.kind = 'parent' AND NEW.state IN ('completed', 'failed'))
BEGIN
    UPDATE jobs_work_signal SET seq = seq + 1 WHERE id = 1;
END;
