"""Meilisearch node target against real Meilisearch 1.21.0 processes."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from miroir_pipeline.fleet.routing import shard_for_key
from miroir_pipeline.fleet.targets.base import IndexNotFound, TargetError, sending_under
from miroir_pipeline.fleet.targets.factory import open_target, open_targets
from miroir_pipeline.fleet.targets.meilisearch import (
    MeilisearchNode,
    TaskFailed,
    _EnqueuedTasks,
    split_ndjson,
    wait_healthy,
)
from tests.fixtures.meilisearch import (
    MeiliFleet,
    MeiliProcess,
    MeiliTopology,
    free_port,
    key_env_name,
)

pytestmark = pytest.mark.meilisearch


def ndjson(docs: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(d).encode() + b"\n" for d in docs)


def routed(pks: list[str | int], shards: int, **fields: object) -> list[dict[str, object]]:
    return [{"id": pk, **fields, "_miroir_shard": shard_for_key(pk, shards)} for pk in pks]


@pytest.fixture
def proc(meili_fleet: MeiliFleet) -> MeiliProcess:
    return meili_fleet(1)[0]


@pytest.fixture
def node(proc: MeiliProcess, meili_topology: MeiliTopology) -> Iterator[MeilisearchNode]:
    topology = meili_topology([proc])
    target = open_target(topology.all_nodes()[0])
    assert isinstance(target, MeilisearchNode)
    yield target
    target.close()


def tasks_of(proc: MeiliProcess, uid: str, kind: str) -> list[dict[str, object]]:
    resp = httpx.get(
        f"{proc.url}/tasks",
        params={"indexUids": uid, "types": kind, "limit": 1000},
        headers={"Authorization": f"Bearer {proc.master_key}"},
    )
    resp.raise_for_status()
    results: list[dict[str, object]] = resp.json()["results"]
    return results


def test_write_count_and_read_back_by_shard(node: MeilisearchNode, meili_index_uid: str) -> None:
    shards = 8
    node.ensure_index(meili_index_uid, "id")
    docs = routed([f"doc-{i}" for i in range(1200)], shards, title="t")
    for start in range(0, 1200, 400):
        node.write_documents(meili_index_uid, "id", ndjson(docs[start : start + 400]), 400)
    assert node.count_documents(meili_index_uid) == 1200

    expected: dict[int, set[str]] = {}
    for d in docs:
        expected.setdefault(int(str(d["_miroir_shard"])), set()).add(str(d["id"]))
    assert node.count_by_shard(meili_index_uid) == {s: len(v) for s, v in expected.items()}

    for shard, ids in expected.items():
        got: list[str] = []
        offset = 0
        while page := node.fetch_shard(meili_index_uid, shard, offset, 64):
            got += [json.loads(d)["id"] for d in page]
            offset += len(page)
        assert sorted(got) == sorted(ids), f"shard {shard} must come back once, completely"
        assert len(got) == len(ids)

    everything = [json.loads(d) for d in node.iter_documents(meili_index_uid, page_size=250)]
    assert len(everything) == 1200
    assert {d["id"] for d in everything} == {d["id"] for d in docs}
    assert all(
        d["title"] == "t" and d["_miroir_shard"] == shard_for_key(d["id"], shards)
        for d in everything
    )


def test_count_by_shard_is_exact_beyond_default_facet_cap(
    node: MeilisearchNode, meili_index_uid: str
) -> None:
    """300 shards: more distinct values than Meilisearch's default maxValuesPerFacet (100)."""
    shards = 300
    node.ensure_index(meili_index_uid, "id")
    docs = routed(list(range(3000)), shards)
    node.write_documents(meili_index_uid, "id", ndjson(docs), len(docs))
    expected: dict[int, int] = {}
    for d in docs:
        s = int(str(d["_miroir_shard"]))
        expected[s] = expected.get(s, 0) + 1
    assert len(expected) > 100
    assert node.count_by_shard(meili_index_uid) == expected


def test_resent_document_replaces(node: MeilisearchNode, meili_index_uid: str) -> None:
    node.ensure_index(meili_index_uid, "id")
    node.write_documents(meili_index_uid, "id", ndjson(routed([1, "a"], 4, v=1)), 2)
    node.write_documents(meili_index_uid, "id", ndjson(routed(["1", "a"], 4, v=2)), 2)
    assert node.count_documents(meili_index_uid) == 2
    assert sorted(json.loads(d)["v"] for d in node.iter_documents(meili_index_uid)) == [2, 2]


def test_batch_is_split_under_payload_limit(
    proc: MeiliProcess, meili_topology: MeiliTopology, meili_index_uid: str
) -> None:
    topology = meili_topology([proc], payload_limit_bytes=2048)
    target = open_targets(topology)["meili-0"]
    try:
        docs = routed([f"k{i}" for i in range(60)], 8, body="x" * 150)
        body = ndjson(docs)
        assert len(body) > 4 * 2048
        target.write_documents(meili_index_uid, "id", body, len(docs))
        additions = tasks_of(proc, meili_index_uid, "documentAdditionOrUpdate")
        assert len(additions) >= len(body) // 2048, "every piece is its own request/task"
        assert all(t["status"] == "succeeded" for t in additions)
        assert target.count_documents(meili_index_uid) == 60
    finally:
        target.close()


def test_default_payload_limit_is_what_a_default_node_takes(
    node: MeilisearchNode, proc: MeiliProcess, meili_index_uid: str
) -> None:
    """A batch between 100 MB and 100 MiB: over a default node's limit, so it is split."""
    docs = routed([f"k{i}" for i in range(1000)], 8, body="x" * 100_250)
    body = ndjson(docs)
    assert 100_000_000 < len(body) < 100 * 1024 * 1024
    node.write_documents(meili_index_uid, "id", body, len(docs))
    additions = tasks_of(proc, meili_index_uid, "documentAdditionOrUpdate")
    assert len(additions) == 2 and all(t["status"] == "succeeded" for t in additions)
    assert node.count_documents(meili_index_uid) == 1000


@pytest.mark.parametrize("limit", [1025, 2048, 5000])
def test_split_ndjson_keeps_lines_whole_and_under_limit(limit: int) -> None:
    body = b"".join(
        ndjson([{"id": f"k{i}", "pad": "y" * (i * 37 % 900), "_miroir_shard": 0}])
        for i in range(200)
    )
    body += b'{"id":"big","x":"' + b"z" * 6000 + b'"}\n'  # one line longer than any limit
    pieces = split_ndjson(body, limit)
    assert b"".join(pieces) == body
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= limit or piece.count(b"\n") == 1


def test_failed_task_names_node_index_and_task(node: MeilisearchNode, meili_index_uid: str) -> None:
    node.ensure_index(meili_index_uid, "id")
    bad = b'{"id":"not a valid id!","_miroir_shard":0}\n'
    with pytest.raises(TaskFailed) as info:
        node.write_documents(meili_index_uid, "id", bad, 1)
    text = str(info.value)
    assert "node meili-0" in text and f"index {meili_index_uid}" in text
    assert f"task {info.value.task_uid}" in text
    assert info.value.code == "invalid_document_id" and "invalid_document_id" in text
    assert not info.value.retryable


def test_a_task_the_node_no_longer_knows_fails_the_write_instead_of_waiting(
    node: MeilisearchNode, meili_index_uid: str
) -> None:
    """A pending write whose task the node cannot find (its task store was replaced, say by a
    restore from an older copy) fails at once, retryably, instead of waiting for the task
    timeout; a task of another index under the same uid is not taken for ours."""
    node.ensure_index(meili_index_uid, "id")
    pending = node.enqueue_routed(meili_index_uid, "id", [b'{"id":"a"}'], ["a"], [0])
    assert isinstance(pending, _EnqueuedTasks)
    [ours] = pending.remaining
    lost = 10**9 + ours  # a uid this node never handed out
    pending.remaining.add(lost)
    node.refresh([pending])  # one poll answers for both: ours is known, the other is not
    assert lost not in pending.remaining and pending.failure is not None
    with pytest.raises(TargetError) as info:
        pending.check()
    assert f"task {lost}" in str(info.value) and "no longer known" in str(info.value)
    assert info.value.retryable and info.value.node_id == node.node_id

    other = node.enqueue_routed(meili_index_uid, "id", [b'{"id":"b"}'], ["b"], [0])
    assert isinstance(other, _EnqueuedTasks)
    other.index_uid = meili_index_uid + "-elsewhere"  # the same uid, but not the index we wrote to
    node.refresh([other])
    with pytest.raises(TargetError, match="is now a task of index"):
        other.check()


def test_node_down_retries_then_retryable_error(
    meili_fleet: MeiliFleet, meili_topology: MeiliTopology
) -> None:
    down = meili_fleet(1, dedicated=True)[0]
    topology = meili_topology([down], node_ids=["node-down"])
    target = open_target(topology.all_nodes()[0], max_retries=3, backoff_base=0.05, backoff_cap=0.2)
    try:
        target.ensure_index("outage", "id")
        down.stop()
        started = time.monotonic()
        with pytest.raises(TargetError) as info:
            target.write_documents("outage", "id", ndjson(routed([1], 4)), 1)
        assert time.monotonic() - started >= 0.05 * 0.5 * (1 + 2 + 4), (
            "it backed off between attempts"
        )
        assert info.value.retryable
        assert info.value.node_id == "node-down"
        text = str(info.value)
        assert "node node-down" in text and "index outage" in text
        assert "4 attempts" in text and "ConnectError" in text
        # Back up on the same port and data: the same target works again.
        down.start()
        target.write_documents("outage", "id", ndjson(routed([1, 2], 4)), 2)
        assert target.count_documents("outage") == 2
    finally:
        target.close()


def test_settings_merge_keeps_user_filterable_attributes(
    node: MeilisearchNode, proc: MeiliProcess, meili_index_uid: str
) -> None:
    node.ensure_index(
        meili_index_uid,
        "id",
        {"filterableAttributes": ["genre"], "searchableAttributes": ["title"]},
    )
    settings = node.get_settings(meili_index_uid)
    assert sorted(settings["filterableAttributes"]) == ["_miroir_shard", "genre"]
    assert settings["searchableAttributes"] == ["title"]
    # A user changes filterable attributes on the node; ensure_index must not clobber them.
    resp = httpx.put(
        f"{proc.url}/indexes/{meili_index_uid}/settings/filterable-attributes",
        json=["year"],
        headers={"Authorization": f"Bearer {proc.master_key}"},
    )
    node.await_task(resp.json()["taskUid"], what="test settings", index_uid=meili_index_uid)
    node.ensure_index(meili_index_uid, "id")
    assert sorted(node.get_settings(meili_index_uid)["filterableAttributes"]) == [
        "_miroir_shard",
        "year",
    ]
    assert node.get_primary_key(meili_index_uid) == "id"


def test_other_primary_key_is_refused(node: MeilisearchNode, meili_index_uid: str) -> None:
    node.ensure_index(meili_index_uid, "id")
    node.ensure_index(meili_index_uid, "id")  # idempotent
    with pytest.raises(TargetError, match=r"already has primary key 'id', not 'isbn'"):
        node.ensure_index(meili_index_uid, "isbn")


def test_missing_index_and_deletes(node: MeilisearchNode, meili_index_uid: str) -> None:
    assert not node.index_exists(meili_index_uid)
    with pytest.raises(IndexNotFound, match=f"node meili-0.*index {meili_index_uid}"):
        node.count_documents(meili_index_uid)
    with pytest.raises(IndexNotFound):
        node.fetch_shard(meili_index_uid, 0, 0, 10)
    node.ensure_index(meili_index_uid, "id")
    node.write_documents(meili_index_uid, "id", ndjson(routed(list(range(10)), 4)), 10)
    node.delete_documents(meili_index_uid, ["1", "2", "absent"])
    assert node.count_documents(meili_index_uid) == 8
    node.delete_index(meili_index_uid)
    assert not node.index_exists(meili_index_uid)
    node.delete_index(meili_index_uid)  # idempotent


def test_api_key_never_in_errors_or_repr(
    proc: MeiliProcess,
    node: MeilisearchNode,
    meili_topology: MeiliTopology,
    monkeypatch: pytest.MonkeyPatch,
    meili_index_uid: str,
) -> None:
    key = proc.master_key
    texts = [repr(node), str(node.__dict__.get("url"))]
    with pytest.raises(IndexNotFound) as missing:
        node.get_settings(meili_index_uid)
    texts += [str(missing.value), repr(missing.value)]
    with pytest.raises(TaskFailed) as failed:
        node.write_documents(meili_index_uid, "id", b'{"id":"bad id","_miroir_shard":0}\n', 1)
    texts += [str(failed.value), repr(failed.value)]

    wrong = "wrong-" + key[::-1]
    node_cfg = meili_topology([proc]).all_nodes()[0]
    monkeypatch.setenv(key_env_name(proc), wrong)
    bad = open_target(node_cfg)
    try:
        with pytest.raises(TargetError) as denied:
            bad.count_documents(meili_index_uid)
        assert key_env_name(proc) in str(denied.value), "names where the key comes from"
        texts += [str(denied.value), repr(denied.value), repr(bad)]
    finally:
        bad.close()
    for text in texts:
        assert key not in text and wrong not in text


def test_missing_key_env_is_reported_by_name(
    proc: MeiliProcess, meili_topology: MeiliTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    node_cfg = meili_topology([proc]).all_nodes()[0]
    monkeypatch.delenv(key_env_name(proc))
    with pytest.raises(TargetError, match=f"{key_env_name(proc)} .*is not set"):
        open_target(node_cfg)


def test_key_mounted_from_a_file_with_its_newline_is_used(
    proc: MeiliProcess, meili_topology: MeiliTopology, monkeypatch: pytest.MonkeyPatch, meili_index_uid: str
) -> None:
    node_cfg = meili_topology([proc]).all_nodes()[0]
    monkeypatch.setenv(key_env_name(proc), proc.master_key + "\n")  # as a Kubernetes secret file
    target = open_target(node_cfg)
    try:
        assert not target.index_exists(meili_index_uid)  # answered, so the key was accepted
    finally:
        target.close()


@pytest.mark.parametrize("value", ["", "  \n", "two words", "ctl\x01char", "caf\u00e9"])
def test_key_a_header_cannot_carry_is_refused_by_name_without_its_value(
    proc: MeiliProcess, meili_topology: MeiliTopology, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    node_cfg = meili_topology([proc]).all_nodes()[0]
    monkeypatch.setenv(key_env_name(proc), value)
    with pytest.raises(TargetError) as refused:
        open_target(node_cfg)
    text = str(refused.value)
    assert f"node {node_cfg.id}: environment variable {key_env_name(proc)}" in text
    assert not refused.value.retryable
    if value.strip():
        assert value.strip() not in text


def test_malformed_request_is_not_retried_and_does_not_quote_the_key(
    proc: MeiliProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built directly, past from_node's check, to reach the transport's own refusal.
    secret = "s3cret-\n-zq9x"
    node = MeilisearchNode("meili-x", proc.url, api_key=secret, api_key_env="X_KEY", max_retries=8)
    backoffs: list[int] = []
    monkeypatch.setattr(node, "_backoff", lambda attempt, _after: backoffs.append(attempt) or 0.0)
    try:
        with pytest.raises(TargetError) as refused:
            node.index_exists("anything")
    finally:
        node.close()
    assert backoffs == [], "refused at once, not retried"
    text = str(refused.value) + repr(refused.value)
    assert "s3cret" not in text and "zq9x" not in text
    assert "could not be sent" in text and "X_KEY" in text
    assert not refused.value.retryable


def test_wait_healthy(proc: MeiliProcess) -> None:
    wait_healthy(proc.url, timeout=5)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TargetError, match="not healthy"):
        wait_healthy(dead, timeout=0.3)


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """FAKE server: answers every request with 503 or 429 - a fault a healthy real Meilisearch
    does not produce on demand. Counts the requests it saw."""

    status = 503
    seen = 0

    def do_POST(self) -> None:
        type(self).seen += 1
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"message":"overloaded","code":"too_many_requests","type":"system"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("status", [429, 503])
def test_overload_answers_are_retried_then_retryable_error(status: int) -> None:
    class Handler(_Unavailable):
        pass

    Handler.status, Handler.seen = status, 0
    handler = Handler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = MeilisearchNode(
        "fake-0", f"http://127.0.0.1:{server.server_address[1]}", max_retries=2, backoff_base=0.01
    )
    try:
        with pytest.raises(TargetError) as info:
            target.write_documents("books", "id", ndjson(routed([1], 4)), 1)
        assert info.value.retryable
        assert f"HTTP {status}: overloaded" in str(info.value) and "3 attempts" in str(info.value)
        assert handler.seen == 3
    finally:
        target.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_write_under_a_guard_stops_retrying_once_the_guard_raises() -> None:
    """The chunk pipeline sends under its lease's guard: the node target checks it before every
    attempt, so a write retrying against an overloaded node stops when the lease is lost."""

    class Handler(_Unavailable):
        pass

    class Gone(Exception):
        pass

    Handler.status, Handler.seen = 503, 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = MeilisearchNode(
        "fake-0", f"http://127.0.0.1:{server.server_address[1]}", max_retries=50, backoff_base=0.001, backoff_cap=0.002
    )
    checks = 0

    def guard() -> None:
        nonlocal checks
        checks += 1
        if checks > 3:
            raise Gone

    try:
        with sending_under(guard), pytest.raises(Gone):
            target.write_documents("books", "id", ndjson(routed([1], 4)), 1)
        assert Handler.seen == 3, "every attempt, the first one included, asked the guard first"
        # Outside the block the guard no longer applies: the whole retry budget is spent.
        with pytest.raises(TargetError, match="51 attempts"):
            target.write_documents("books", "id", ndjson(routed([1], 4)), 1)
        assert Handler.seen == 3 + 51
    finally:
        target.close()
        server.shutdown()
        server.server_close()
        thread.join(5)


class _NeverIndexes(http.server.BaseHTTPRequestHandler):
    """Takes every write and never finishes its task. FAKE: a real node's task cannot be held
    'processing' for as long as a test needs."""

    polls = 0

    def _answer(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(b'{"taskUid":7,"enqueuedAt":"2026-12-04T00:00:00Z","status":"enqueued"}', 202)

    def do_GET(self) -> None:
        type(self).polls += 1
        self._answer(b'{"uid":7,"enqueuedAt":"2026-12-04T00:00:00Z","status":"processing"}')

    def log_message(self, *args: object) -> None:
        pass


def test_a_write_under_a_guard_stops_waiting_for_its_task_once_the_guard_raises() -> None:
    """A write awaiting its task (isolating a refused document, say) checks the guard between
    polls too: a drain or a lost lease does not wait for the node to finish indexing."""

    class Handler(_NeverIndexes):
        pass

    class Gone(Exception):
        pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    target = MeilisearchNode("fake-0", f"http://127.0.0.1:{server.server_address[1]}", task_timeout=20)
    stop = threading.Event()

    def guard() -> None:
        if stop.is_set():
            raise Gone

    def stop_once_polled() -> None:
        while Handler.polls < 3:
            time.sleep(0.005)
        stop.set()

    stopper = threading.Thread(target=stop_once_polled, daemon=True)
    stopper.start()
    try:
        # Without the check, the wait ends only at the task timeout, with a TargetError.
        with sending_under(guard), pytest.raises(Gone):
            target.write_documents("books", "id", ndjson(routed([1], 4)), 1)
    finally:
        stop.set()
        stopper.join(5)
        target.close()
        server.shutdown()
        server.server_close()
        thread.join(5)
