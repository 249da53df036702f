"""Local node store: replace-by-primary-key, shard reads and counts, paging, concurrent writers."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miroir_pipeline.fleet.routing import shard_for_key
from miroir_pipeline.fleet.targets import local_store
from miroir_pipeline.fleet.targets.base import IndexNotFound, TargetError
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.targets.local_store import LocalNodeStore
from miroir_pipeline.fleet.topology import default_topology

SHARDS = 8


def ndjson(docs: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def doc(pk: str | int, **fields: object) -> dict[str, object]:
    return {"id": pk, **fields, "_miroir_shard": shard_for_key(pk, SHARDS)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalNodeStore]:
    s = LocalNodeStore("node-0", tmp_path / "node-0")
    yield s
    s.close()


def test_a_write_is_on_disk_when_it_returns(store: LocalNodeStore) -> None:
    """The chunk's cursor is saved in another database once the write returns: the write must
    survive a power loss by then (WAL with synchronous=FULL syncs at every commit; NORMAL only
    at checkpoints, so a power loss could lose writes the cursor has already passed). A power
    loss cannot be produced here; the setting the write runs under is what is checked."""
    store.ensure_index("books", "id")
    store.write_documents("books", "id", ndjson([doc("a")]), 1)
    with store._lock:  # the connection the writes use
        conn = store._connection()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_resent_document_replaces_old_one(store: LocalNodeStore) -> None:
    store.write_documents("books", "id", ndjson([doc(1, v=1), doc("a", v=1)]), 2)
    # Integer 1 and string "1" are the same document in Meilisearch.
    store.write_documents("books", "id", ndjson([doc("1", v=2), doc("a", v=2)]), 2)
    assert store.count_documents("books") == 2
    got = sorted((json.loads(d) for d in store.iter_documents("books")), key=lambda d: str(d["id"]))
    assert [(str(d["id"]), d["v"]) for d in got] == [("1", 2), ("a", 2)]


def test_shard_reads_and_counts_match_routing(store: LocalNodeStore) -> None:
    docs = [doc(f"k{i}", n=i) for i in range(600)]
    for start in range(0, 600, 150):
        store.write_documents("books", "id", ndjson(docs[start : start + 150]), 150)
    expected: dict[int, set[str]] = {}
    for d in docs:
        expected.setdefault(int(d["_miroir_shard"]), set()).add(str(d["id"]))  # type: ignore[call-overload]
    assert store.count_by_shard("books") == {s: len(ids) for s, ids in expected.items()}
    assert store.count_documents("books") == 600
    for shard, ids in expected.items():
        pages: list[str] = []
        offset = 0
        while page := store.fetch_shard("books", shard, offset, 7):
            pages += [json.loads(d)["id"] for d in page]
            offset += len(page)
        assert pages == sorted(ids), f"shard {shard}: pages must cover it once, in key order"


def test_paging_is_stable_without_writes(store: LocalNodeStore) -> None:
    store.write_documents("books", "id", ndjson([doc(i) for i in range(300)]), 300)
    shard = shard_for_key(0, SHARDS)
    first = [store.fetch_shard("books", shard, off, 10) for off in range(0, 100, 10)]
    again = [store.fetch_shard("books", shard, off, 10) for off in range(0, 100, 10)]
    assert first == again
    all_docs = list(store.iter_documents("books", page_size=17))
    assert len(all_docs) == 300
    assert len({json.loads(d)["id"] for d in all_docs}) == 300


def test_document_keeps_its_bytes_and_shard_field(store: LocalNodeStore) -> None:
    line = b'{"id":"x-1","nested":{"a":[1,2,{"b":null}]},"t":"\\u00e9t\xc3\xa9","_miroir_shard":5}'
    store.write_documents("books", "id", line + b"\n", 1)
    assert store.fetch_shard("books", 5, 0, 10) == [line]


def test_batch_count_mismatch_is_refused(store: LocalNodeStore) -> None:
    with pytest.raises(TargetError, match=r"node-0.*books.*2 NDJSON lines but 3"):
        store.write_documents("books", "id", ndjson([doc(1), doc(2)]), 3)
    assert not store.index_exists("books")


def test_line_without_key_names_its_position(store: LocalNodeStore) -> None:
    body = ndjson([doc(1), {"title": "no id", "_miroir_shard": 0}])
    with pytest.raises(TargetError, match=r"node-0: index books: document 2 of the batch"):
        store.write_documents("books", "id", body, 2)
    # Nothing of a refused batch is written.
    assert not store.index_exists("books")


def test_other_primary_key_is_refused(store: LocalNodeStore) -> None:
    store.ensure_index("books", "id")
    assert store.get_primary_key("books") == "id"
    with pytest.raises(TargetError, match=r"already has primary key 'id', not 'isbn'"):
        store.write_documents("books", "isbn", b'{"isbn":"1","_miroir_shard":0}\n', 1)


def test_missing_index_raises_index_not_found(store: LocalNodeStore) -> None:
    assert not store.index_exists("nope")
    for call in (
        lambda: store.count_documents("nope"),
        lambda: store.count_by_shard("nope"),
        lambda: store.fetch_shard("nope", 0, 0, 10),
        lambda: list(store.iter_documents("nope")),
        lambda: store.get_settings("nope"),
        lambda: store.get_primary_key("nope"),
    ):
        with pytest.raises(IndexNotFound, match="node-0: index nope does not exist"):
            call()


def test_settings_merge_keeps_user_filterable_attributes(store: LocalNodeStore) -> None:
    store.ensure_index(
        "books", "id", {"filterableAttributes": ["genre"], "rankingRules": ["words"]}
    )
    store.ensure_index("books", "id", {"searchableAttributes": ["title"]})
    settings = store.get_settings("books")
    assert settings["filterableAttributes"] == ["genre", "_miroir_shard"]
    assert settings["rankingRules"] == ["words"]
    assert settings["searchableAttributes"] == ["title"]


def test_delete_documents_and_index(store: LocalNodeStore) -> None:
    store.write_documents("books", "id", ndjson([doc(i) for i in range(10)]), 10)
    store.delete_documents("books", ["1", "2", "not-there"])
    assert store.count_documents("books") == 8
    store.delete_index("books")
    assert not store.index_exists("books")
    store.delete_index("books")  # idempotent
    store.write_documents("books", "id", ndjson([doc(1)]), 1)
    assert store.count_documents("books") == 1


def _writer(path: str, worker: int, batches: int, per_batch: int) -> None:
    """Child process: writes its own keys plus keys shared with the other writer."""
    s = LocalNodeStore("node-0", path, busy_timeout_s=60)
    for b in range(batches):
        docs = [doc(f"w{worker}-{b}-{i}", by=worker) for i in range(per_batch)]
        docs += [doc(f"shared-{i}", by=worker, batch=b) for i in range(20)]
        s.write_documents("books", "id", ndjson(docs), len(docs))
    s.close()


def test_concurrent_writers_from_two_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "node-0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 25, 200)) for w in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, f"writer pid {p.pid} exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    s = LocalNodeStore("node-0", path)
    ids = [json.loads(d)["id"] for d in s.iter_documents("books", page_size=500)]
    assert len(ids) == len(set(ids)) == 2 * 25 * 200 + 20
    assert sum(s.count_by_shard("books").values()) == s.count_documents("books") == len(ids)
    s.close()


def test_writer_waits_its_turn_and_gives_up_retryably(tmp_path: Path) -> None:
    """Writers take turns on the node's lock file: a held turn holds a write back, releasing it
    lets the write through at once, and a turn held past busy_timeout_s fails retryably."""
    store = LocalNodeStore("node-0", tmp_path / "node-0", busy_timeout_s=0.3)
    store.write_documents("books", "id", ndjson([doc(1)]), 1)
    holder = os.open(tmp_path / "node-0" / local_store.LOCK_FILENAME, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another writer's turn (flock locks are per open file)
        with pytest.raises(TargetError, match="node node-0: index books: write_documents waited") as caught:
            store.write_documents("books", "id", ndjson([doc(2)]), 1)
        assert caught.value.retryable
        patient = LocalNodeStore("node-0", tmp_path / "node-0", busy_timeout_s=60)
        done = threading.Event()
        writer = threading.Thread(target=lambda: (patient.write_documents("books", "id", ndjson([doc(3)]), 1), done.set()))
        writer.start()
        assert not done.wait(0.05), "the write went through while the turn was held"
        fcntl.flock(holder, fcntl.LOCK_UN)
        writer.join(60)
        assert done.is_set()
        patient.close()
    finally:
        os.close(holder)
        store.close()
    assert LocalNodeStore("node-0", tmp_path / "node-0").count_documents("books") == 2


def test_unusable_writer_lock_file_is_a_clear_target_error(tmp_path: Path) -> None:
    (tmp_path / "node-0" / local_store.LOCK_FILENAME).mkdir(parents=True)  # cannot be opened as a file
    store = LocalNodeStore("node-0", tmp_path / "node-0")
    try:
        with pytest.raises(TargetError, match=r"node node-0: cannot open the writer lock file .*write access"):
            store.write_documents("books", "id", ndjson([doc(1)]), 1)
    finally:
        store.close()


def test_factory_opens_a_local_store_per_node(tmp_path: Path) -> None:
    targets = open_targets(default_topology(tmp_path, shards=4))
    try:
        assert sorted(targets) == ["node-0", "node-1", "node-2"]
        assert all(isinstance(t, LocalNodeStore) for t in targets.values())
        targets["node-1"].write_documents("books", "id", b'{"id":1,"_miroir_shard":2}\n', 1)
        assert (tmp_path / "nodes" / "node-1" / "store.sqlite3").is_file()
        assert not targets["node-0"].index_exists("books")
    finally:
        for t in targets.values():
            t.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.one_of(st.integers(0, 30), st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)),
                st.text(max_size=30),
            ),
            max_size=40,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_property_batches_land_as_a_last_write_wins_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batches: list[list[tuple[int | str, str]]]
) -> None:
    """Whatever the batches (keys repeated within and across them and across the pieces a
    batch is written in, non-ASCII text), the store holds each key's last version, byte for
    byte, with its shard."""
    monkeypatch.setattr(local_store, "_PIECE_BYTES", 300)  # a few documents per statement
    store = LocalNodeStore("node-p", tmp_path / f"p-{uuid.uuid4().hex}")
    try:
        want: dict[str, tuple[bytes, int]] = {}
        for number, batch in enumerate(batches):
            lines = [json.dumps(doc(pk, v=number, t=text), ensure_ascii=False).encode() for pk, text in batch]
            shards = [shard_for_key(pk, SHARDS) for pk, _ in batch]
            store.write_routed("books", "id", lines, [pk for pk, _ in batch], shards)
            for (pk, _), line, shard in zip(batch, lines, shards, strict=True):
                want[str(pk)] = (line, shard)
        assert store.count_documents("books") == len(want)
        assert sorted(store.iter_documents("books")) == sorted(line for line, _ in want.values())
        by_shard: dict[int, int] = {}
        for _, shard in want.values():
            by_shard[shard] = by_shard.get(shard, 0) + 1
        assert store.count_by_shard("books") == by_shard
    finally:
        store.close()
