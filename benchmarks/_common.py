"""Shared plumbing for the benchmark scripts: scratch dir, cached sample dumps, machine facts,
load average, medians, and a result record (printed and saved as JSON under the scratch dir).

Benchmarks compare against a baseline measured in the same run and print ratios; nothing here
asserts a timing. Run any script from the repository root, e.g.
``.venv/bin/python benchmarks/routing_throughput.py --quick``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO_ROOT))

MIB = 1 << 20
GIB = 1 << 30


def scratch_dir(*parts: str) -> Path:
    """``$MIROIR_BENCH_DIR`` (default ``/work/scratch/bench``) joined with ``parts``, created."""
    base = Path(os.environ.get("MIROIR_BENCH_DIR", "/work/scratch/bench")).resolve()
    if base == REPO_ROOT or REPO_ROOT in base.parents:
        raise SystemExit(
            f"MIROIR_BENCH_DIR={base} is inside the repository; pick a scratch dir outside it"
        )
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sample_dump(size_bytes: int, *, seed: int = 0) -> tuple[Path, int]:
    """A cached ~1 KiB-document NDJSON dump of about ``size_bytes`` (``write_sample_dump``);
    returns (path, documents). Reused across scripts and runs: generating 1 GiB takes a while."""
    from miroir_pipeline.jobs.dump_import.sample_dump import write_sample_dump

    root = scratch_dir("dumps")
    path = root / f"sample-{size_bytes}-s{seed}.ndjson"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, int(json.loads(meta.read_text())["documents"])
    tmp = path.with_suffix(".tmp")
    t0 = time.monotonic()
    docs, written = write_sample_dump(tmp, size_bytes, seed=seed)
    tmp.rename(path)
    meta.write_text(json.dumps({"documents": docs, "bytes": written}))
    print(
        f"  (generated {path.name}: {docs:,} documents, {written / MIB:.0f} MiB in {time.monotonic() - t0:.0f} s)"
    )
    return path, docs


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, Any]:
    """nproc, CPU model, RAM and Python version (for the README table)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(ram / GIB, 1),
        "python": platform.python_version(),
        "git": _git_head(),
    }


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@dataclass
class Results:
    """One benchmark's record: rows of figures, plus machine and load, saved as JSON."""

    name: str
    args: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_start: tuple[float, float, float] = field(default_factory=loadavg)

    def add(self, **row: Any) -> None:
        row.setdefault("load1", round(loadavg()[0], 2))
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("  note: " + text)

    def save(self) -> Path:
        out = scratch_dir("results") / f"{self.name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
        record = {
            "name": self.name,
            "args": self.args,
            "machine": machine(),
            "load_start": self.load_start,
            "load_end": loadavg(),
            "rows": self.rows,
            "notes": self.notes,
        }
        out.write_text(json.dumps(record, indent=2, default=str))
        print(f"\nresults saved to {out}")
        return out


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table (copy-pasteable into the README)."""
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def compile_package(root: Path = REPO_ROOT) -> None:
    """Byte-compile ``root``'s ``miroir_pipeline`` into its ``__pycache__``, as installing a wheel
    does. A checkout run under ``PYTHONDONTWRITEBYTECODE=1`` (set on some machines) otherwise
    compiles every module from source in each fresh process: ~0.3 s per process start on a
    2-core box, a cost no installed deployment pays."""
    import compileall

    compileall.compile_dir(str(root / "miroir_pipeline"), quiet=1)


def header(title: str, args: Any) -> None:
    compile_package()
    m = machine()
    print(f"== {title}")
    print(
        f"   {m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Python {m['python']}, git {m['git']}"
    )
    print(f"   load average {' '.join(f'{x:.2f}' for x in loadavg())}; args {vars(args)}")


@contextmanager
def scratch_subdir(name: str, *, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under the scratch dir, removed afterwards unless ``keep``."""
    path = scratch_dir() / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def parse_sizes(text: str) -> list[int]:
    """Comma-separated sizes with units (``64MiB,1GiB``)."""
    from miroir_pipeline.util.sizes import parse_size

    return [parse_size(s.strip()) for s in text.split(",") if s.strip()]


def fmt_size(n: int) -> str:
    from miroir_pipeline.util.sizes import format_size

    return str(format_size(n))


def plan_local_import(root: Path, dump: Path, chunk_size: int) -> tuple[Any, Any, Any, Any, Any]:
    """Plan an import of ``dump`` on the embedded defaults under ``root`` (SQLite jobs store,
    three local nodes): ``(topology, store, targets, settings, planned)``."""
    from miroir_pipeline.fleet.targets.factory import open_targets
    from miroir_pipeline.fleet.topology import default_topology
    from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.queue import open_store

    topo = default_topology(root)
    store = open_store(f"sqlite:///{root}/jobs.sqlite3")
    targets = open_targets(topo)
    settings = PipelineSettings(
        allowed_roots=[str(dump.parent)], staging_dir=str(root / "staging"), chunk_size_bytes=chunk_size
    )
    request = DumpImportRequest(uri=str(dump), index_uid="bench", primary_key="id")
    planned = plan_dump_import(store, request, topo, targets, settings)
    return topo, store, targets, settings, planned


def run_dump_chunks(store: Any, targets: Any, settings: Any, worker: str) -> int:
    """The library's own worker loop, with no Dagster: claim a dump-import chunk, process it,
    until none is left. Chunks run."""
    from miroir_pipeline.jobs.dump_import import process_dump_chunk

    chunks = 0
    while (lease := store.claim(["dump_import"], worker, settings.lease_ttl)) is not None:
        process_dump_chunk(store, lease, targets, settings)
        chunks += 1
    return chunks
