"""Fixed cost of one small import: `miroir-pipeline import` against the library alone.

A small dump (default 3 MiB, ~3,000 documents) is imported on the embedded defaults (SQLite
jobs store, three local node stores, a local Dagster home) by:

* **cli**: ``miroir-pipeline import DUMP --index I --workers 1 --json`` in a fresh process, as
  an operator runs it. While it runs, this script polls the jobs database every 5 ms and
  records when the parent row appears (planned) and when a chunk first leaves ``queued``
  (the first claim);
* **pool**: the same command with ``--workers 0`` while one ``miroir-pipeline worker`` (started
  once, idle, Dagster already loaded) runs against the same embedded defaults in its own home,
  as an operator with a worker pool imports; timed the same way;
* **bare** (the baseline, the least any way can spend): one Python process that imports the
  library, plans the same dump and processes its chunks directly, with no Dagster at all.

Fixed cost = cli total - bare total (medians); the ratio cli / bare is printed too, and the same
for pool. The modes alternate within each round. Each Dagster home is warmed by one untimed
import first, so its one-time storage creation is not counted.
``--tree PATH`` runs the cli from another checkout of the repository (``PYTHONPATH=PATH``),
to compare two versions in one run.

    .venv/bin/python benchmarks/import_fixed_cost.py [--rounds 5] [--size 3MiB] [--tree PATH [--no-pool]]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

BARE = """
import sys, time
t0 = time.monotonic()
sys.path.insert(0, {bench!r})
import _common as c
from pathlib import Path
root, dump = Path({root!r}), Path({dump!r})
topo, store, targets, settings, planned = c.plan_local_import(root, dump, {chunk})
c.run_dump_chunks(store, targets, settings, "bare")
assert store.get(planned.parent.id).state == "completed"
print(time.monotonic() - t0)
"""


def cli_env(dump: Path, tree: str | None) -> dict[str, str]:
    env = dict(os.environ, MIROIR_ALLOWED_ROOTS=str(dump.parent))
    for name in ("DAGSTER_HOME", "MIROIR_HOME", "MIROIR_JOBS_DSN", "MIROIR_TOPOLOGY"):
        env.pop(name, None)  # the embedded defaults, all under ./.miroir of the working directory
    if tree:
        env["PYTHONPATH"] = tree
    return env


def cli_bin() -> str:
    return str(Path(sys.executable).parent / "miroir-pipeline")


def start_pool(home: Path, dump: Path, tree: str | None) -> subprocess.Popen[bytes]:
    """One idle pool worker in ``home``, returned once it logs that it waits for work."""
    log = home / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [cli_bin(), "--log-level", "INFO", "worker", "--quiet"],
            cwd=home, env=cli_env(dump, tree), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while b"waiting for work" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pool(proc)
            raise SystemExit(f"the pool worker did not start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return proc


def stop_pool(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cli_once(home: Path, dump: Path, index: str, tree: str | None, workers: int = 1) -> dict[str, Any]:
    env = cli_env(dump, tree)
    cmd = [cli_bin(), "import", str(dump), "--index", index, "--workers", str(workers), "--json"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    planned = claimed = None
    db = home / ".miroir" / "jobs.sqlite3"
    while proc.poll() is None:
        if db.exists() and claimed is None:
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                try:
                    rows = conn.execute(
                        "SELECT kind, state FROM jobs WHERE id LIKE ? OR parent_job_id LIKE ?",
                        (f"import-{index}-%", f"import-{index}-%"),
                    ).fetchall()
                finally:
                    conn.close()
            except sqlite3.Error:
                rows = []
            now = time.monotonic() - t0
            if rows and planned is None:
                planned = now
            if any(k == "chunk" and s != "queued" for k, s in rows):
                claimed = now
        time.sleep(0.005)
    out, err = proc.communicate()
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"import failed ({proc.returncode}): {err.decode()[-2000:]}")
    summary = json.loads(out)
    return {"planned_s": planned, "first_claim_s": claimed, "total_s": total, "docs": summary["documents"]}


def bare_once(root: Path, dump: Path, chunk: int) -> float:
    code = BARE.format(bench=str(Path(__file__).parent), root=str(root), dump=str(dump), chunk=chunk)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bare import failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", default="3MiB")
    ap.add_argument("--tree", help="run the cli from this checkout (PYTHONPATH) instead of this one")
    ap.add_argument("--no-pool", action="store_true", help="skip the pool mode (a --tree without `import --workers 0`)")
    args = ap.parse_args()
    c.header("fixed cost of one small import: the CLI against the library alone", args)
    if args.tree:
        c.compile_package(Path(args.tree))  # the other checkout starts as an installed one too
    size = c.parse_sizes(args.size)[0]
    dump, docs = c.sample_dump(size)
    res = c.Results("import_fixed_cost", vars(args))
    with c.scratch_subdir("fixed-cost") as root:
        home, pool_home = root / "cli", root / "pool"
        home.mkdir()
        pool_home.mkdir()
        cli_once(home, dump, "warmup", args.tree)  # Dagster storage created once, untimed
        pool = None if args.no_pool else start_pool(pool_home, dump, args.tree)
        try:
            if pool is not None:
                cli_once(pool_home, dump, "warmup", args.tree, workers=0)
            clis: list[dict[str, Any]] = []
            pools: list[dict[str, Any]] = []
            bares: list[float] = []
            for i in range(args.rounds):
                clis.append(cli_once(home, dump, f"r{i}", args.tree))
                if pool is not None:
                    pools.append(cli_once(pool_home, dump, f"r{i}", args.tree, workers=0))
                bare_root = root / f"bare{i}"
                bare_root.mkdir()
                bares.append(bare_once(bare_root, dump, 256 << 20))
                r = clis[-1]
                p = f"pool first claim {pools[-1]['first_claim_s']:.2f} s, total {pools[-1]['total_s']:.2f} s; " if pools else ""
                print(
                    f"  round {i}: cli planned {r['planned_s']:.2f} s, first claim {r['first_claim_s']:.2f} s, "
                    f"total {r['total_s']:.2f} s; {p}bare {bares[-1]:.2f} s (load {c.loadavg()[0]:.2f})"
                )
        finally:
            if pool is not None:
                stop_pool(pool)
    bare = c.median(bares)
    for mode, runs in (("cli --workers 1", clis), ("pool --workers 0", pools)):
        if not runs:
            continue
        med = {k: c.median([float(r[k]) for r in runs]) for k in ("planned_s", "first_claim_s", "total_s")}
        res.add(
            mode=mode,
            documents=docs,
            planned_s=round(med["planned_s"], 2),
            first_claim_s=round(med["first_claim_s"], 2),
            cli_total_s=round(med["total_s"], 2),
            bare_total_s=round(bare, 2),
            fixed_cost_s=round(med["total_s"] - bare, 2),
            cli_vs_bare=round(med["total_s"] / bare, 2),
            goal_first_claim_1s=med["first_claim_s"] <= 1.0,
        )
    print()
    c.print_table(
        res.rows,
        ["mode", "documents", "planned_s", "first_claim_s", "cli_total_s", "bare_total_s", "fixed_cost_s", "cli_vs_bare", "goal_first_claim_1s", "load1"],
    )
    res.save()


if __name__ == "__main__":
    main()
