"""Fixed cost of one small import: `miroir-pipeline import` against the library alone.

A small dump (default 3 MiB, ~3,000 documents) is imported on the embedded defaults (SQLite
jobs store, three local node stores, a local Dagster home) by:

* **cli**: ``miroir-pipeline import DUMP --index I --workers 1 --json`` in a fresh process, as
  an operator runs it. While it runs, this script polls the jobs database every 5 ms and
  records when the parent row appears (planned) and when a chunk first leaves ``queued``
  (the first claim);
* **bare** (the baseline, the least any way can spend): one Python process that imports the
  library, plans the same dump and processes its chunks directly, with no Dagster at all.

Fixed cost = cli total - bare total (medians); the ratio cli / bare is printed too. The Dagster
home is warmed by one untimed import first, so its one-time storage creation is not counted.
``--tree PATH`` runs the cli from another checkout of the repository (``PYTHONPATH=PATH``),
to compare two versions in one run.

    .venv/bin/python benchmarks/import_fixed_cost.py [--rounds 5] [--size 3MiB] [--tree PATH]
"""

from __future__ import annotations

import argparse
import json
import os
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


def cli_once(home: Path, dump: Path, index: str, tree: str | None) -> dict[str, Any]:
    env = dict(os.environ, MIROIR_ALLOWED_ROOTS=str(dump.parent))
    for name in ("DAGSTER_HOME", "MIROIR_HOME", "MIROIR_JOBS_DSN", "MIROIR_TOPOLOGY"):
        env.pop(name, None)  # the embedded defaults, all under ./.miroir of the working directory
    if tree:
        env["PYTHONPATH"] = tree
    cmd = [str(Path(sys.executable).parent / "miroir-pipeline"), "import", str(dump), "--index", index]
    cmd += ["--workers", "1", "--json"]
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
    args = ap.parse_args()
    c.header("fixed cost of one small import: the CLI against the library alone", args)
    if args.tree:
        c.compile_package(Path(args.tree))  # the other checkout starts as an installed one too
    size = c.parse_sizes(args.size)[0]
    dump, docs = c.sample_dump(size)
    res = c.Results("import_fixed_cost", vars(args))
    with c.scratch_subdir("fixed-cost") as root:
        home = root / "cli"
        home.mkdir()
        cli_once(home, dump, "warmup", args.tree)  # Dagster storage created once, untimed
        clis: list[dict[str, Any]] = []
        bares: list[float] = []
        for i in range(args.rounds):
            clis.append(cli_once(home, dump, f"r{i}", args.tree))
            bare_root = root / f"bare{i}"
            bare_root.mkdir()
            bares.append(bare_once(bare_root, dump, 256 << 20))
            r = clis[-1]
            print(
                f"  round {i}: cli planned {r['planned_s']:.2f} s, first claim {r['first_claim_s']:.2f} s, "
                f"total {r['total_s']:.2f} s; bare {bares[-1]:.2f} s (load {c.loadavg()[0]:.2f})"
            )
    med = {k: c.median([float(r[k]) for r in clis]) for k in ("planned_s", "first_claim_s", "total_s")}
    bare = c.median(bares)
    res.add(
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
        ["documents", "planned_s", "first_claim_s", "cli_total_s", "bare_total_s", "fixed_cost_s", "cli_vs_bare", "goal_first_claim_1s", "load1"],
    )
    res.save()


if __name__ == "__main__":
    main()
