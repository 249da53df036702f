"""Hostile inputs: malformed dumps and configurations, all made in code.

Every one gives a clear error — naming the dump and the line/byte offset, or the bad file or
field, and what to do — and loses nothing silently:

- a bad line under ``fail``: the chunk and its parent are failed, nothing is marked done;
- the same line under ``skip``: it goes to the dead-letter file (with line and offset) and
  imported + dead-lettered == lines, the good documents placed exactly;
- a bad source or configuration: refused before any job is queued, nothing left staged.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from miroir_pipeline.fleet.targets.base import TargetError
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology, TopologyError, load_topology
from miroir_pipeline.jobs.dump_import import (
    DumpImportRequest,
    InvalidDocumentError,
    plan_dump_import,
    process_dump_chunk,
)
from miroir_pipeline.jobs.dump_import.dead_letter import DeadLetterMissing
from miroir_pipeline.jobs.dump_import.params import is_invalid_document_error
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, JobStore
from miroir_pipeline.sources import DumpSourceError
from tests.failure.conftest import REPO, init_dagster_home, settings_for
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    local_topology,
    make_docs,
    write_dump,
)

MAX_DOC = 1024  # the smallest document limit settings allow: makes "huge" lines cheap
BLOCK = 4096

# --- bad lines ---------------------------------------------------------------------------

LINE_CASES: list[tuple[str, bytes, str]] = [
    ("json-truncated-object", b'{"id": 7, "broken": ', "invalid JSON"),
    ("json-trailing-comma", b'{"id": 8,}', "invalid JSON"),
    ("json-single-quotes", b"{'id': 9}", "invalid JSON"),
    ("json-bare-word", b"hello", "invalid JSON"),
    ("json-unclosed-string", b'{"id": "abc}', "invalid JSON"),
    ("json-two-objects", b'{"id": 10}{"id": 11}', "invalid JSON"),
    ("json-nan", b'{"id": 12, "x": NaN}', "invalid JSON"),
    ("not-object-array", b"[1, 2, 3]", "not a JSON object"),
    ("not-object-number", b"42", "not a JSON object"),
    ("not-object-string", b'"just text"', "not a JSON object"),
    ("not-object-null", b"null", "not a JSON object"),
    ("not-object-true", b"true", "not a JSON object"),
    ("pk-float", b'{"id": 1.5}', "float"),
    ("pk-exponent", b'{"id": 1e3}', "float"),
    ("pk-bool", b'{"id": true}', "boolean"),
    ("pk-null", b'{"id": null}', "null"),
    ("pk-object", b'{"id": {"a": 1}}', "is an object"),
    ("pk-array", b'{"id": [1]}', "is an array"),
    ("pk-empty", b'{"id": ""}', "empty"),
    ("pk-too-long", b'{"id": "' + b"k" * 512 + b'"}', "512 bytes"),
    ("pk-space", b'{"id": "has space"}', "characters outside"),
    ("pk-non-ascii", '{"id": "café"}'.encode(), "characters outside"),
    ("pk-slash", b'{"id": "a/b"}', "characters outside"),
    ("pk-missing", b'{"name": "no id"}', "missing"),
    ("invalid-utf8", b'{"id": "ok-utf8", "v": "\xff\xfe"}', "invalid UTF-8"),
    ("nul-in-string", b'{"id": 13, "v": "a\x00b"}', "invalid JSON"),
    ("nul-bytes-line", b"\x00\x00\x00", "invalid JSON"),
    ("bom-mid-file", b'\xef\xbb\xbf{"id": 14}', "invalid JSON"),
    ("huge-line-in-block", b'{"id": 15, "pad": "' + b"x" * 2000 + b'"}', f"over the {MAX_DOC}-byte limit"),
    ("huge-line-over-blocks", b'{"id": 16, "pad": "' + b"y" * (3 * BLOCK) + b'"}', f"longer than the {MAX_DOC}-byte document limit"),
]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    topo = local_topology(tmp_path / "nodes", shards=8)
    yield {"root": tmp_path, "store": store, "topo": topo, "targets": open_targets(topo)}
    store.close()


def _settings(root: Path, **kw: Any) -> PipelineSettings:
    return settings_for(root, max_document_bytes=MAX_DOC, read_block_bytes=BLOCK, batch_size=7, **kw)


def _bad_dump(root: Path, bad: bytes) -> tuple[Path, list[dict[str, Any]], int]:
    """40 good documents with ``bad`` as line 21; returns the dump, the good docs, bad's offset."""
    docs = make_docs(40, seed=9)
    lines = [orjson.dumps(d) for d in docs]
    lines.insert(20, bad)
    dump = root / "hostile.ndjson"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    return dump, docs, sum(len(x) + 1 for x in lines[:20])


@pytest.mark.parametrize(("bad", "reason"), [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES])
def test_bad_line_under_fail_fails_chunk_and_parent_naming_line_and_offset(env: dict[str, Any], bad: bytes, reason: str) -> None:
    root, store = env["root"], env["store"]
    dump, _, offset = _bad_dump(root, bad)
    settings = _settings(root)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="hostile", primary_key="id"), env["topo"], env["targets"], settings)
    lease = store.claim(["dump_import"], "w", 30)
    assert lease is not None
    with pytest.raises(InvalidDocumentError) as err:
        process_dump_chunk(store, lease, env["targets"], settings)
    message = str(err.value)
    where = f"{dump}: line 21, byte offset {offset}: "
    assert where in message, message
    assert reason in message.split(where, 1)[1], message
    assert "--on-invalid skip" in message  # what to do
    for chunk in store.children(plan.parent.id):
        assert chunk.state == JobState.FAILED and chunk.error is not None and "line 21" in chunk.error
        assert int(chunk.progress.get("last_cursor", 0)) <= offset, "the cursor moved past the bad line"
    assert store.get(plan.parent.id).state == JobState.FAILED
    assert store.claim(["dump_import"], "w2", 30) is None, "a bad line is not retried"


@pytest.mark.parametrize(("bad", "reason"), [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES])
def test_bad_line_under_skip_is_dead_lettered_and_counted(env: dict[str, Any], bad: bytes, reason: str) -> None:
    root, store = env["root"], env["store"]
    dump, docs, offset = _bad_dump(root, bad)
    settings = _settings(root, on_invalid_document="skip")
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="hostile", primary_key="id"), env["topo"], env["targets"], settings)
    while (lease := store.claim(["dump_import"], "w", 30)) is not None:
        process_dump_chunk(store, lease, env["targets"], settings)
    summary = store.parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert summary.progress["docs_routed"] == len(docs)
    assert summary.progress["invalid_documents"] == 1
    assert summary.progress["docs_routed"] + summary.progress["invalid_documents"] == len(docs) + 1  # == lines
    dead = [orjson.loads(x) for f in sorted((root / "dlq" / plan.parent.id).glob("*.ndjson")) for x in f.read_bytes().splitlines()]
    assert len(dead) == 1
    [rec] = dead
    assert rec["dump"] == str(dump) and rec["line"] == 21 and rec["byte_offset"] == offset
    assert reason in rec["reason"], rec["reason"]
    assert_exact_placement(expected_placement(docs, env["topo"]), actual_placement(env["targets"], "hostile"))


def test_every_bad_line_in_one_multi_chunk_dump_under_skip(env: dict[str, Any]) -> None:
    """All the bad lines at once, across chunk and block boundaries: counts still add up."""
    root, store = env["root"], env["store"]
    docs = make_docs(600, seed=10)
    lines = [orjson.dumps(d) for d in docs]
    for i, (_, bad, _) in enumerate(LINE_CASES):
        lines.insert(5 + i * 20, bad)
    dump = root / "all-bad.ndjson"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    settings = _settings(root, on_invalid_document="skip", chunk_size_bytes=8 * 1024)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="allbad", primary_key="id"), env["topo"], env["targets"], settings)
    assert len(plan.chunk_ids) > 5
    while (lease := store.claim(["dump_import"], "w", 30)) is not None:
        process_dump_chunk(store, lease, env["targets"], settings)
    summary = store.parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert summary.progress["invalid_documents"] == len(LINE_CASES)
    assert summary.progress["docs_routed"] + summary.progress["invalid_documents"] == len(lines)
    data = dump.read_bytes()
    dead = [orjson.loads(x) for f in sorted((root / "dlq" / plan.parent.id).glob("*.ndjson")) for x in f.read_bytes().splitlines()]
    assert len(dead) == len(LINE_CASES)
    for rec in dead:
        assert data.count(b"\n", 0, rec["byte_offset"]) + 1 == rec["line"]
        assert data[rec["byte_offset"] - 1 : rec["byte_offset"]] == b"\n"  # points at a line start
    assert_exact_placement(expected_placement(docs, env["topo"]), actual_placement(env["targets"], "allbad"))


# --- bad sources: refused before any job is queued ---------------------------------------

GOOD = b"".join(orjson.dumps(d) + b"\n" for d in make_docs(50, seed=2))


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _meili_dump(path: Path, members: dict[str, bytes], *, version: str = "V6", links: dict[str, str] | None = None) -> Path:
    """A tar.gz in Meilisearch's v6 layout with the given extra members (and symlinks)."""
    with tarfile.open(path, "w:gz") as tar:
        _tar_member(tar, "./metadata.json", json.dumps({"dumpVersion": version, "dbVersion": "1.21.0"}).encode())
        for name, data in members.items():
            _tar_member(tar, name, data)
        for name, target in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type = tarfile.SYMTYPE
            link.linkname = target
            tar.addfile(link)
    return path


def _index_meta(uid: str = "movies", pk: str = "id") -> dict[str, bytes]:
    return {f"./indexes/{uid}/metadata.json": json.dumps({"uid": uid, "primaryKey": pk}).encode()}


@dataclass
class SourceCase:
    make: Callable[[Path, Path], str]  # (root inside the allowed roots, a dir outside) -> URI
    expected: tuple[str, ...]  # substrings of the error
    primary_key: str | None = "id"


def _truncated_gzip(root: Path, _: Path) -> str:
    p = root / "cut.ndjson.gz"
    p.write_bytes(gzip.compress(GOOD * 20)[:-64])
    return str(p)


def _fake_gzip(root: Path, _: Path) -> str:
    p = root / "fake.ndjson.gz"
    p.write_bytes(GOOD)
    return str(p)


def _gzip_noise_dump(root: Path, _: Path) -> str:
    p = root / "noise.dump"
    p.write_bytes(gzip.compress(os.urandom(4096)))
    return str(p)


def _truncated_dump(root: Path, _: Path) -> str:
    p = _meili_dump(root / "cut.dump", {**_index_meta(), "./indexes/movies/documents.jsonl": os.urandom(200_000).hex().encode()})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return str(p)


def _plain_tar(root: Path, _: Path) -> str:
    p = root / "plain.dump"
    with tarfile.open(p, "w") as tar:
        _tar_member(tar, "./metadata.json", b"{}")
    return str(p)


def _traversal_dump(root: Path, _: Path) -> str:
    return str(
        _meili_dump(
            root / "evil.dump",
            {
                **_index_meta(),
                "../../escaped/documents.jsonl": GOOD,
                "/tmp/miroir-failure-escape.jsonl": GOOD,
                "./indexes/movies/../../../escaped-docs/documents.jsonl": GOOD,
            },
        )
    )


def _symlink_dump(root: Path, _: Path) -> str:
    return str(_meili_dump(root / "link.dump", _index_meta(), links={"./indexes/movies/documents.jsonl": "/etc/passwd"}))


def _old_version_dump(root: Path, _: Path) -> str:
    return str(_meili_dump(root / "old.dump", {**_index_meta(), "./indexes/movies/documents.jsonl": GOOD}, version="V5"))


def _unapplied_updates_dump(root: Path, _: Path) -> str:
    return str(
        _meili_dump(
            root / "pending.dump",
            {**_index_meta(), "./indexes/movies/documents.jsonl": GOOD, "./tasks/update_files/0000.jsonl": GOOD},
        )
    )


def _directory(root: Path, _: Path) -> str:
    d = root / "a-directory.ndjson"
    d.mkdir()
    return str(d)


def _missing(root: Path, _: Path) -> str:
    return str(root / "nowhere.ndjson")


def _outside(_: Path, outside: Path) -> str:
    p = outside / "outside.ndjson"
    p.write_bytes(GOOD)
    return str(p)


def _dotdot_escape(root: Path, outside: Path) -> str:
    p = outside / "dotdot.ndjson"
    p.write_bytes(GOOD)
    return str(root) + "/../" + os.path.relpath(p, root.parent)


def _symlink_escape(root: Path, outside: Path) -> str:
    target = outside / "secret.ndjson"
    target.write_bytes(GOOD)
    link = root / "innocent.ndjson"
    link.symlink_to(target)
    return str(link)


def _file_uri_escape(_: Path, outside: Path) -> str:
    p = outside / "uri.ndjson"
    p.write_bytes(GOOD)
    return f"file://{p}"


def _pk_two_candidates(root: Path, _: Path) -> str:
    p = root / "two-ids.ndjson"
    p.write_bytes(b'{"id": 1, "user_id": 2, "title": "x"}\n')
    return str(p)


def _pk_no_candidate(root: Path, _: Path) -> str:
    p = root / "no-id.ndjson"
    p.write_bytes(b'{"name": "x", "title": "y"}\n')
    return str(p)


def _pk_first_line_broken(root: Path, _: Path) -> str:
    p = root / "broken-first.ndjson"
    p.write_bytes(b'{"id": 1,, }\n' + GOOD)
    return str(p)


SOURCE_CASES = {
    "truncated-gzip": SourceCase(_truncated_gzip, ("cut.ndjson.gz", "not valid gzip", "check that the file is complete")),
    "gz-name-not-gzip": SourceCase(_fake_gzip, ("fake.ndjson.gz", "not gzip-compressed")),
    "dump-not-a-tar": SourceCase(_gzip_noise_dump, ("noise.dump", "holds no tar archive")),
    "dump-truncated": SourceCase(_truncated_dump, ("cut.dump", "not a readable tar.gz archive", "check that the file is complete")),
    "dump-uncompressed-tar": SourceCase(_plain_tar, ("plain.dump", "uncompressed tar archive")),
    "dump-path-traversal": SourceCase(_traversal_dump, ("evil.dump", "has no documents for index 'movies'")),
    "dump-symlink-member": SourceCase(_symlink_dump, ("link.dump", "link or special file", "refusing to follow")),
    "dump-old-version": SourceCase(_old_version_dump, ("old.dump", "dumpVersion 'V5'", "dump again")),
    "dump-unapplied-updates": SourceCase(_unapplied_updates_dump, ("pending.dump", "still queued", "Take the dump again")),
    "directory": SourceCase(_directory, ("a-directory.ndjson", "is a directory", "pass the NDJSON file")),
    "missing-file": SourceCase(_missing, ("nowhere.ndjson", "does not exist")),
    "outside-roots": SourceCase(_outside, ("outside.ndjson", "outside the allowed dump roots", "move the dump")),
    "dotdot-escape": SourceCase(_dotdot_escape, ("dotdot.ndjson", "outside the allowed dump roots")),
    "symlink-escape": SourceCase(_symlink_escape, ("innocent.ndjson", "outside the allowed dump roots")),
    "file-uri-escape": SourceCase(_file_uri_escape, ("uri.ndjson", "outside the allowed dump roots")),
    "pk-two-candidates": SourceCase(_pk_two_candidates, ("two-ids.ndjson", "cannot infer the primary key", "'id'", "'user_id'", "pass --primary-key"), None),
    "pk-no-candidate": SourceCase(_pk_no_candidate, ("no-id.ndjson", "cannot infer the primary key", "none", "pass --primary-key"), None),
    "pk-first-line-broken": SourceCase(_pk_first_line_broken, ("broken-first.ndjson", "cannot infer the primary key", "pass --primary-key"), None),
}


@pytest.fixture
def outside_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside-the-roots")


@pytest.mark.parametrize("case", list(SOURCE_CASES.values()), ids=list(SOURCE_CASES))
def test_bad_source_is_refused_before_any_job_is_queued(env: dict[str, Any], outside_dir: Path, case: SourceCase) -> None:
    root: Path = env["root"] / "dumps"
    root.mkdir()
    uri = case.make(root, outside_dir)
    settings = settings_for(root, staging_dir=str(env["root"] / "staging"))
    with pytest.raises(ValueError) as err:
        plan_dump_import(env["store"], DumpImportRequest(uri=uri, index_uid="movies", primary_key=case.primary_key), env["topo"], env["targets"], settings)
    message = str(err.value)
    for part in case.expected:
        assert part in message, message
    assert env["store"].list_parents() == [], "a job was queued for a refused dump"
    staging = env["root"] / "staging"
    staged = {p.name for p in staging.iterdir()} if staging.exists() else set()
    # A complete staged copy (with its marker) may stay for reuse; a partial one may not.
    partial = {n for n in staged if not n.endswith(".complete") and n + ".complete" not in staged}
    assert not partial, f"partial staged copies left behind: {partial}"
    if case.make is _unapplied_updates_dump:  # refused after staging: nothing kept for reuse
        assert not staged, f"staged copy of a refused dump left behind: {staged}"
    assert not (outside_dir.parent / "escaped").exists() and not Path("/tmp/miroir-failure-escape.jsonl").exists()
    for target in env["targets"].values():
        assert not target.index_exists("movies"), "a node was touched for a refused dump"


# --- permission denied (as user nobody) and a full staging disk ---------------------------

_PLAN_AS_NOBODY = """
import os, sys
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.queue import open_store
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import load_topology
dsn, topo_file, dump, root = sys.argv[1:]
store = open_store(dsn)
topo = load_topology(topo_file)
targets = open_targets(topo)
os.setgroups([]); os.setgid(65534); os.setuid(65534)  # from here on: user nobody
settings = PipelineSettings(allowed_roots=[root], staging_dir=root + "/staging", dead_letter_dir=root + "/dlq")
try:
    plan_dump_import(store, DumpImportRequest(uri=dump, index_uid="locked", primary_key="id"), topo, targets, settings)
    print("PLANNED")
except ValueError as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory user nobody can traverse (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="miroir-hostile-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to user nobody")
def test_unreadable_dump_is_refused_for_the_worker_user(world_dir: Path) -> None:
    dump = world_dir / "locked.ndjson"
    dump.write_bytes(GOOD)
    dump.chmod(0o000)
    topo = local_topology(world_dir / "nodes", shards=4)
    topo_file = world_dir / "topology.yaml"
    topo_file.write_text(yaml.safe_dump(topo.model_dump(mode="json")))
    dsn = f"sqlite:///{world_dir}/jobs.sqlite3"
    store = open_store(dsn)
    proc = subprocess.run(
        [sys.executable, "-c", _PLAN_AS_NOBODY, dsn, str(topo_file), str(dump), str(world_dir)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip()
    assert out.startswith("REFUSED DumpSourceError"), out + proc.stderr[-2000:]
    assert repr(str(dump)) in out and "permission denied" in out and "readable by the user" in out, out
    assert store.list_parents() == []
    store.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs for the staging area (root only; unmounted afterwards)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, timeout=30, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)


def test_full_staging_disk_refuses_the_import_and_leaves_nothing(env: dict[str, Any], tiny_disk: Path) -> None:
    root: Path = env["root"]
    big = b"".join(b'{"id":%d,"pad":"%s"}\n' % (i, os.urandom(48).hex().encode()) for i in range(30_000))
    assert len(big) > 3 * 1024 * 1024
    src = root / "big.ndjson.gz"
    src.write_bytes(gzip.compress(big, compresslevel=1))
    settings = settings_for(root, staging_dir=str(tiny_disk))
    with pytest.raises(ValueError) as err:
        plan_dump_import(env["store"], DumpImportRequest(uri=str(src), index_uid="full", primary_key="id"), env["topo"], env["targets"], settings)
    message = str(err.value)
    assert str(tiny_disk) in message and "is full" in message and "needs at least" in message, message
    assert env["store"].list_parents() == []
    assert list(tiny_disk.iterdir()) == [], "the partial staged copy was left on the full disk"


# --- bad configuration ------------------------------------------------------------------------

NODE = {"id": "a", "url": "local:///tmp/miroir-x"}
TOPOLOGY_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "shards-zero": ({"shards": 0, "groups": [{"id": 0, "nodes": [NODE]}]}, ("shards", "greater than or equal to 1")),
    "rf-larger-than-group": (
        {"shards": 4, "replication_factor": 2, "groups": [{"id": 0, "nodes": [NODE]}]},
        ("replication_factor", "larger than group 0", "1 node"),
    ),
    "duplicate-node-ids": (
        {"shards": 4, "groups": [{"id": 0, "nodes": [NODE]}, {"id": 1, "nodes": [NODE]}]},
        ("node id 'a'", "group 0 and group 1", "must be unique"),
    ),
    "unknown-url-scheme": (
        {"shards": 4, "groups": [{"id": 0, "nodes": [{"id": "a", "url": "ftp://127.0.0.1/x"}]}]},
        ("groups[0].nodes[0].url", "unknown URL scheme", "ftp://", "http://, https://"),
    ),
    "no-groups": ({"shards": 4, "groups": []}, ("groups",)),
    "unknown-field": ({"shards": 4, "shard_count": 8, "groups": [{"id": 0, "nodes": [NODE]}]}, ("shard_count",)),
}


@pytest.mark.parametrize(("data", "expected"), list(TOPOLOGY_CASES.values()), ids=list(TOPOLOGY_CASES))
def test_bad_topology_file_names_the_file_and_the_field(tmp_path: Path, data: dict[str, Any], expected: tuple[str, ...]) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TopologyError) as err:
        load_topology(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid topology: "), message
    for part in expected:
        assert part in message, message


def test_unknown_api_key_env_is_refused_naming_node_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIROIR_NO_SUCH_KEY_VAR", raising=False)
    topo = Topology.parse(
        {"shards": 4, "groups": [{"id": 0, "nodes": [{"id": "meili-x", "url": "http://127.0.0.1:9", "api_key_env": "MIROIR_NO_SUCH_KEY_VAR"}]}]}
    )
    with pytest.raises(TargetError) as err:
        open_targets(topo)
    message = str(err.value)
    assert "node meili-x" in message and "MIROIR_NO_SUCH_KEY_VAR" in message and "is not set" in message and "export it" in message


@pytest.mark.slow
def test_cli_import_with_a_bad_topology_is_refused_before_any_job_is_queued(tmp_path: Path) -> None:
    """End to end through `miroir-pipeline import`: exit 2, the file and field named, no job."""
    dump = write_dump(tmp_path / "d.ndjson", make_docs(20))
    topo_file = tmp_path / "bad-topology.yaml"
    topo_file.write_text(yaml.safe_dump({"shards": 0, "groups": [{"id": 0, "nodes": [NODE]}]}))
    init_dagster_home(tmp_path / "dagster")
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster"), "MIROIR_ALLOWED_ROOTS": str(tmp_path), "MIROIR_JOBS_DSN": dsn}
    cmd = [sys.executable, "-m", "miroir_pipeline.cli", "import", str(dump), "--index", "x", "--topology", str(topo_file), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert str(topo_file) in proc.stderr and "shards" in proc.stderr, proc.stderr[-3000:]
    store: JobStore = open_store(dsn)
    assert store.list_parents() == []
    store.close()


class _CrashAfterCommit(Exception):
    """Fake fault: the worker dies right after the commit that recorded a dead letter."""


def test_resume_on_a_host_without_the_dead_letter_file_is_refused_not_padded(tmp_path: Path) -> None:
    """A chunk resumed where its dead-letter file is missing (``dead_letter_dir`` not shared)
    must fail the attempt naming the file, not pad the file with NUL bytes up to the
    committed size; with the file back in place the chunk resumes and completes."""
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3", retry_backoff_base=0.05)
    topo = local_topology(tmp_path / "nodes", shards=8)
    targets = open_targets(topo)
    try:
        dump, docs, _ = _bad_dump(tmp_path, LINE_CASES[0][1])
        settings = _settings(tmp_path, on_invalid_document="skip")
        plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="dlq", primary_key="id"), topo, targets, settings)
        [chunk_id] = plan.chunk_ids

        def crash_once_dead_lettered(report: Any) -> None:
            if report.invalid_documents:
                raise _CrashAfterCommit

        lease = store.claim(["dump_import"], "host1", 30)
        assert lease is not None
        with pytest.raises(_CrashAfterCommit):
            process_dump_chunk(store, lease, targets, settings, on_batch=crash_once_dead_lettered)
        committed = int(store.get(chunk_id).progress["dead_letter_bytes"])
        first = tmp_path / "dlq" / plan.parent.id / f"{chunk_id}.ndjson"
        assert committed > 0 and first.stat().st_size == committed
        kept = first.read_bytes()

        # host2 mounts a different (empty) dead-letter directory.
        host2 = _settings(tmp_path, on_invalid_document="skip", dead_letter_dir=str(tmp_path / "host2-dlq"))
        lease = _claim_after_backoff(store)
        with pytest.raises(DeadLetterMissing) as refused:
            process_dump_chunk(store, lease, targets, host2)
        missing = tmp_path / "host2-dlq" / plan.parent.id / f"{chunk_id}.ndjson"
        assert str(missing) in str(refused.value) and f"has {committed}" in str(refused.value)
        assert not missing.exists(), "nothing written where the records are not"
        row = store.get(chunk_id)
        assert row.state == JobState.QUEUED and row.error is not None and str(missing) in row.error
        assert not row.error.startswith("DeadLetterMissing"), "the message says it all"

        lease = _claim_after_backoff(store)
        process_dump_chunk(store, lease, targets, settings)
        assert store.get(plan.parent.id).state == JobState.COMPLETED
        assert first.read_bytes() == kept, "the one dead letter, once, no padding"
        assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "dlq"))
    finally:
        store.close()


def _claim_after_backoff(store: JobStore, timeout: float = 30.0) -> Any:
    """The re-queued chunk, as soon as its retry backoff lets it be claimed."""
    deadline = time.monotonic() + timeout
    while (lease := store.claim(["dump_import"], "host2", 30)) is None:
        assert time.monotonic() < deadline, "the failed chunk never became claimable again"
        time.sleep(0.02)
    return lease


# --- a dump changed under an unfinished import ------------------------------------------------


def _versioned(version: int, pad: int = 0) -> bytes:
    return b"".join(orjson.dumps({"id": i, "v": version, "pad": "x" * pad}) + b"\n" for i in range(1000))


def test_restaged_dump_does_not_overwrite_the_copy_an_unfinished_import_reads(env: dict[str, Any]) -> None:
    """A gzip dump refreshed under the same name and planned again stages beside the first
    copy: the first import's chunks still read the documents they were planned on."""
    root, store, topo, targets = env["root"], env["store"], env["topo"], env["targets"]
    settings = _settings(root, chunk_size_bytes=4096)
    src = root / "products.jsonl.gz"
    src.write_bytes(gzip.compress(_versioned(1)))
    first = plan_dump_import(store, DumpImportRequest(uri=str(src), index_uid="products", primary_key="id"), topo, targets, settings)
    src.write_bytes(gzip.compress(_versioned(2, pad=7)))
    second = plan_dump_import(store, DumpImportRequest(uri=str(src), index_uid="products", primary_key="id"), topo, targets, settings)
    assert first.data_uri != second.data_uri
    assert Path(first.data_uri).read_bytes() == _versioned(1)
    for planned, version in ((first, 1), (second, 2)):
        for chunk_id in planned.chunk_ids:
            lease = store.claim_by_id(chunk_id, "w", 30)
            process_dump_chunk(store, lease, targets, settings)
        assert store.get(planned.parent.id).state == JobState.COMPLETED
        docs = {k: d for node in actual_placement(targets, "products").values() for k, d in node.items()}
        assert len(docs) == 1000 and {d["v"] for d in docs.values()} == {version}, planned.parent.id


@pytest.mark.parametrize("change", ["longer", "same size, lines moved"])
def test_dump_replaced_under_an_import_fails_its_chunks_naming_the_change(env: dict[str, Any], change: str) -> None:
    """A plain NDJSON dump (read in place) replaced after planning: the chunk's byte range would
    cut the new file's lines, so the worker refuses it, saying what changed and what to do."""
    root, store, topo, targets = env["root"], env["store"], env["topo"], env["targets"]
    settings = _settings(root, chunk_size_bytes=4096)
    dump = root / "products.ndjson"
    planned_bytes = _versioned(1, pad=5)
    dump.write_bytes(planned_bytes)
    planned = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="replaced", primary_key="id"), topo, targets, settings)
    if change == "longer":
        dump.write_bytes(_versioned(2, pad=6))
        expected = f"planned {len(planned_bytes)} bytes, now {dump.stat().st_size}"
    else:  # the first line 3 bytes longer, the last 3 shorter: every boundary between moves
        lines = planned_bytes.splitlines(keepends=True)
        lines[0] = lines[0].replace(b'"xxxxx"', b'"xxxxxxxx"')
        lines[-1] = lines[-1].replace(b'"xxxxx"', b'"xx"')
        dump.write_bytes(b"".join(lines))
        assert dump.stat().st_size == len(planned_bytes)
        expected = "no longer begins a line"
    chunk_id = planned.chunk_ids[1]
    lease = store.claim_by_id(chunk_id, "w", 30)
    with pytest.raises(DumpSourceError, match="changed since this import was planned") as refused:
        process_dump_chunk(store, lease, targets, settings)
    assert expected in str(refused.value) and "Put the planned file back" in str(refused.value)
    row = store.get(chunk_id)
    assert row.error is not None and "changed since this import was planned" in row.error
    assert all(not held for held in actual_placement(targets, "replaced").values()), "nothing of the new file was sent"


def test_symlink_put_on_a_planned_dump_path_is_not_followed_out_of_the_roots(tmp_path: Path) -> None:
    """The allowed roots are checked on the dump's real path at planning; a directory swapped for
    a symlink to somewhere else afterwards must not lead the workers there."""
    root, outside = tmp_path / "allowed", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "x.ndjson").write_bytes(_versioned(1))
    (outside / "x.ndjson").write_bytes(_versioned(9))  # same size, never to be imported
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    topo = local_topology(tmp_path / "nodes", shards=8)
    targets = open_targets(topo)
    try:
        settings = settings_for(root)
        planned = plan_dump_import(store, DumpImportRequest(uri=str(root / "d" / "x.ndjson"), index_uid="roots", primary_key="id"), topo, targets, settings)
        shutil.rmtree(root / "d")
        os.symlink(outside, root / "d")
        [chunk_id] = planned.chunk_ids
        lease = store.claim_by_id(chunk_id, "w", 30)
        with pytest.raises(DumpSourceError, match="now resolves to") as refused:
            process_dump_chunk(store, lease, targets, settings)
        assert str(outside / "x.ndjson") in str(refused.value)
        assert all(not held for held in actual_placement(targets, "roots").values())
    finally:
        store.close()


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_bad_line_in_a_gzip_dump_is_placed_in_the_decompressed_documents(env: dict[str, Any], policy: str) -> None:
    """Lines and offsets of a gzip'd dump are counted in its decompressed documents: the error
    and the dead letter say so and name the staged copy, where the offset is exact."""
    root, store = env["root"], env["store"]
    bad = b'{"id": "broken",'
    docs = make_docs(40, seed=9)
    lines = [orjson.dumps(d) for d in docs]
    lines.insert(20, bad)
    plain = b"\n".join(lines) + b"\n"
    dump = root / "hostile.jsonl.gz"
    dump.write_bytes(gzip.compress(plain))
    offset = plain.index(bad)
    settings = _settings(root, on_invalid_document=policy)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="gz", primary_key="id"), env["topo"], env["targets"], settings)
    assert Path(plan.data_uri).read_bytes()[offset:].startswith(bad)
    lease = store.claim(["dump_import"], "w", 30)
    if policy == "fail":
        with pytest.raises(InvalidDocumentError) as refused:
            process_dump_chunk(store, lease, env["targets"], settings)
        message = str(refused.value)
        assert f"{dump} (decompressed, as staged in {plan.data_uri}): line 21, byte offset {offset}: " in message
        assert is_invalid_document_error(store.get(lease.job_id).error)
    else:
        process_dump_chunk(store, lease, env["targets"], settings)
        [record] = [orjson.loads(x) for f in (root / "dlq" / plan.parent.id).glob("*.ndjson") for x in f.read_bytes().splitlines()]
        assert record["dump"] == str(dump) and record["staged_as"] == plan.data_uri
        assert record["line"] == 21 and record["byte_offset"] == offset
