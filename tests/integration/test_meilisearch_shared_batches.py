"""A node batches the additions of every client of an index and fails a batch as a whole:
a document is only taken as refused when the error is its own.

Real Meilisearch 1.21.0. The neighbour is a second client of the same index, driven at the
moments that matter: before each of our writes it enqueues a large addition, waits until the
node is processing it (observed in the task list), then enqueues its own document, so our
write queues behind both and the node puts the neighbour's document and ours in one batch.
Every test checks that the batch really was shared, so none can pass by timing luck.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest

from miroir_pipeline.fleet.routing import shard_for_key
from miroir_pipeline.fleet.targets.base import DocumentsRefused, TargetError
from miroir_pipeline.fleet.targets.meilisearch import (
    EnqueuedTask,
    MeilisearchNode,
    blames,
    names_document,
)
from tests.fixtures.meilisearch import MeiliFleet, MeiliProcess

pytestmark = pytest.mark.meilisearch

#: Large enough that one node thread is still indexing it when our write arrives.
_BLOCKER_DOCS = 60_000
_WAIT_S = 60.0


class Neighbour:
    """Another client of the index: before each of the next ``rounds`` writes of ``node`` it
    enqueues a blocker and, once that is processing, ``document``; it records the task uids."""

    def __init__(self, proc: MeiliProcess, index_uid: str, document: bytes, rounds: int) -> None:
        self.client = httpx.Client(
            base_url=proc.url, headers={"Authorization": f"Bearer {proc.master_key}"}, timeout=60.0
        )
        self.index_uid = index_uid
        self.document = document
        self.rounds = rounds
        self.tasks: list[int] = []
        self.lock = threading.Lock()
        self.blocker = b"".join(
            json.dumps({"id": f"blocker-{i}", "text": "x" * 80}).encode() + b"\n" for i in range(_BLOCKER_DOCS)
        )

    def _post(self, body: bytes) -> int:
        resp = self.client.post(
            f"/indexes/{self.index_uid}/documents",
            content=body,
            params={"primaryKey": "id"},
            headers={"Content-Type": "application/x-ndjson"},
        )
        resp.raise_for_status()
        return int(resp.json()["taskUid"])

    def task(self, uid: int) -> dict[str, object]:
        resp = self.client.get(f"/tasks/{uid}")
        resp.raise_for_status()
        task: dict[str, object] = resp.json()
        return task

    def before_write(self) -> None:
        with self.lock:
            if self.rounds <= 0:
                return
            self.rounds -= 1
        blocker = self._post(self.blocker)
        deadline = time.monotonic() + _WAIT_S
        while self.task(blocker)["status"] == "enqueued":
            assert time.monotonic() < deadline, "the blocker never started"
            time.sleep(0.005)
        self.tasks.append(self._post(self.document))

    def batches(self) -> set[object]:
        return {self.task(uid).get("batchUid") for uid in self.tasks}

    def close(self) -> None:
        self.client.close()


class NodeWithNeighbour(MeilisearchNode):
    """A real node target whose every enqueue of documents is preceded by the neighbour's."""

    neighbour: Neighbour
    ours: list[int]

    def _enqueue_documents(self, index_uid: str, primary_key: str, ndjson: bytes, count: int) -> list[EnqueuedTask]:
        self.neighbour.before_write()
        tasks = super()._enqueue_documents(index_uid, primary_key, ndjson, count)
        self.ours.extend(task.uid for task in tasks)
        return tasks


@pytest.fixture
def proc(meili_fleet: MeiliFleet) -> MeiliProcess:
    # Dedicated: the blockers hold the node's one scheduler, which other tests would wait on.
    return meili_fleet(1, dedicated=True)[0]


@pytest.fixture
def index_uid(proc: MeiliProcess) -> str:
    node = MeilisearchNode("n0", proc.url, api_key=proc.master_key)
    try:
        node.ensure_index("shared", "id", {"filterableAttributes": ["_geo"]})
    finally:
        node.close()
    return "shared"


def make_node(proc: MeiliProcess, neighbour: Neighbour, *, max_retries: int) -> NodeWithNeighbour:
    node = NodeWithNeighbour("n0", proc.url, api_key=proc.master_key, max_retries=max_retries, backoff_base=0.01, backoff_cap=0.05)
    node.neighbour = neighbour
    node.ours = []
    return node


@pytest.fixture
def neighbours(proc: MeiliProcess) -> Iterator[list[Neighbour]]:
    made: list[Neighbour] = []
    yield made
    for n in made:
        n.close()


def write(node: MeilisearchNode, index_uid: str, docs: Sequence[dict[str, object]]) -> None:
    lines = [
        json.dumps({**d, "_miroir_shard": shard_for_key(d["id"], 1)}).encode().replace(b'"HUGE"', b"-1e400")  # type: ignore[arg-type]
        for d in docs
    ]
    node.write_routed(index_uid, "id", lines, [d["id"] for d in docs], [0] * len(docs))  # type: ignore[misc]


def stored(proc: MeiliProcess, index_uid: str, pk: str) -> bool:
    resp = httpx.get(
        f"{proc.url}/indexes/{index_uid}/documents/{pk}", headers={"Authorization": f"Bearer {proc.master_key}"}
    )
    return resp.status_code == 200


def shared_with_ours(node: NodeWithNeighbour, neighbour: Neighbour) -> bool:
    ours = {neighbour.task(uid).get("batchUid") for uid in node.ours}
    return bool(ours & neighbour.batches())


#: Nested deeper than a node parses (its own message names no document).
DEEP: object = 0
for _ in range(130):
    DEEP = [DEEP]

BAD_GEO = b'{"id":"theirs","_geo":{"lat":"north","lng":1}}\n'  # the node names the document
BAD_NUMBER = b'{"id":"theirs","x":1e400}\n'  # the node names no document


@pytest.mark.parametrize("bad", [BAD_GEO, BAD_NUMBER], ids=["message-names-it", "message-names-none"])
def test_a_good_document_batched_with_a_neighbours_bad_one_is_written_not_refused(
    proc: MeiliProcess, index_uid: str, neighbours: list[Neighbour], bad: bytes
) -> None:
    neighbour = Neighbour(proc, index_uid, bad, rounds=2)
    neighbours.append(neighbour)
    node = make_node(proc, neighbour, max_retries=4)
    try:
        write(node, index_uid, [{"id": "ours", "title": "good"}])
    finally:
        node.close()
    assert shared_with_ours(node, neighbour), "the neighbour's document never shared a batch with ours"
    assert neighbour.rounds == 0
    assert stored(proc, index_uid, "ours")
    assert not stored(proc, index_uid, "theirs")


def test_a_neighbour_failing_every_batch_makes_the_write_retryable_not_a_refusal(
    proc: MeiliProcess, index_uid: str, neighbours: list[Neighbour]
) -> None:
    neighbour = Neighbour(proc, index_uid, BAD_NUMBER, rounds=3)
    neighbours.append(neighbour)
    node = make_node(proc, neighbour, max_retries=2)
    try:
        with pytest.raises(TargetError) as caught:
            write(node, index_uid, [{"id": "ours", "title": "good"}])
    finally:
        node.close()
    assert not isinstance(caught.value, DocumentsRefused)
    assert caught.value.retryable
    assert "--experimental-max-number-of-batched-tasks 1" in str(caught.value)
    assert "number out of range" in str(caught.value)
    assert shared_with_ours(node, neighbour)
    assert not stored(proc, index_uid, "ours")


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"_geo": {"lat": "north", "lng": 1}}, "mine-bad"),
        ({"id": 77, "_geo": {"lat": "north", "lng": 1}}, '`"77"`'),
        ({"x": [1, "HUGE"]}, "number out of range"),
        ({"x": DEEP}, "recursion limit exceeded"),
    ],
    ids=["message-names-it", "message-names-an-integer-key", "number-out-of-range", "nested-too-deep"],
)
def test_our_bad_document_batched_with_a_neighbours_good_one_is_still_refused(
    proc: MeiliProcess, index_uid: str, neighbours: list[Neighbour], bad: dict[str, object], words: str
) -> None:
    """The message names our document, or names none but says what ours has (a number out of
    range, nesting too deep): it is refused at once, the good one beside it lands. The neighbour shares every write of ours,
    the whole batch and each half of it."""
    neighbour = Neighbour(proc, index_uid, b'{"id":"theirs","title":"fine"}\n', rounds=10)
    neighbours.append(neighbour)
    node = make_node(proc, neighbour, max_retries=4)
    try:
        with pytest.raises(DocumentsRefused) as caught:
            write(node, index_uid, [{"id": "mine-ok", "title": "good"}, {"id": "mine-bad", **bad}])
    finally:
        node.close()
    assert neighbour.task(node.ours[-1])["batchUid"] == neighbour.task(neighbour.tasks[-1])["batchUid"]
    # Refused at its first write alone: the last one, and shared.
    assert [r.position for r in caught.value.refused] == [1]
    assert words in caught.value.refused[0].message
    assert stored(proc, index_uid, "mine-ok")
    assert stored(proc, index_uid, "theirs")


def test_names_document_compares_the_json_encoded_key() -> None:
    geo = "Index `x`: Could not parse latitude in the document with the id: `\"g-1\"`. Was expecting"
    assert names_document(geo, "g-1") is True
    assert names_document(geo, "g") is False
    # A real node quotes every id as a string, an integer one included.
    assert names_document("in the document with the id: `\"12\"`.", 12) is True
    assert names_document("in the document with the id: `\"12\"`.", 13) is False
    assert names_document("dimensions in document with id `a3`", "a3") is True
    assert names_document("expected a map in the document with id: `a4`", "a4") is True
    assert names_document("Document identifier `\"a b\"` is invalid.", "a b") is True
    assert names_document("internal: number out of range at line 1 column 5.", "g") is None


def test_blames_a_number_out_of_range_only_on_a_document_that_has_one() -> None:
    message = "Index `x`: internal: number out of range at line 1 column 5."
    assert blames(message, b'{"id":"a","x":{"y":[1,-1e400]}}', "a") is True
    assert blames(message, b'{"id":"a","x":1e308}', "a") is False
    assert blames(message, b'{"id":"a","x":[1' + b"0" * 400 + b"]}", "a") is True
    assert blames("internal: invalid type: integer `3`, expected a map at line 1 column 1", b'{"id":"a"}', "a") is None
    assert blames("in the document with the id: `\"a\"`.", b'{"id":"a"}', "a") is True


def test_blames_nesting_too_deep_only_on_a_document_that_nests_too_deep() -> None:
    message = "Index `x`: internal: recursion limit exceeded at line 1 column 130."
    assert blames(message, json.dumps({"id": "a", "x": DEEP}).encode(), "a") is True
    assert blames(message, json.dumps({"id": "a", "x": [[[1]]]}).encode(), "a") is False
