"""Documents a target refuses never take the good documents of their batch down with them.

Two layers are exercised, on local nodes and on a real Meilisearch 1.21 fleet, under both
policies: what every target refuses (a duplicated primary-key field, nesting deeper than 128,
a non-object ``_vectors``) is caught by the router and fails or dead-letters that one line;
what only the node knows to refuse (an invalid ``_geo`` once ``_geo`` is filterable, a number
out of the float range in a field the router does not read) is isolated by writing the batch by halves, so every other document of the batch still lands.
Every case checks exact placement of the good documents and the dead letter's contents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from miroir_pipeline.fleet.targets.base import DocumentsRefused, NodeTarget
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import (
    DumpImportRequest,
    InvalidDocumentError,
    ReplicasDisagree,
    plan_dump_import,
    process_dump_chunk,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobState
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    local_topology,
    make_docs,
)

#: What every target refuses, and the words the pipeline uses for it.
ROUTER_CATCHES = [
    (b'{"id":"d1","id":"d2","t":"dup"}', "appears more than once"),
    (b'{"\\u0069d":"e1","id":"e2"}', "appears more than once"),
    (b'{"id":"n300","x":' + b"[" * 300 + b"1" + b"]" * 300 + b"}", "deeper than 128"),
    (b'{"id":"n100k","x":' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}", "deeper than 128"),
    (b'{"id":"v1","_vectors":"x"}', "_vectors must be an object"),
]
#: Refused by a Meilisearch node only once ``_geo`` is filterable (the pipeline cannot know).
GEO_BAD = b'{"id":"geo_bad","_geo":{"lat":"north","lng":2}}'
#: A number beyond the 64-bit float range in a field the router does not read: Meilisearch fails
#: the whole task with code ``internal`` ("number out of range"), which blames the document.
HUGE_NUMBER = b'{"id":"huge","x":{"y":[1,-1e400]}}'


def settings_for(root: Path, **kw: Any) -> PipelineSettings:
    return PipelineSettings(
        allowed_roots=[str(root)], staging_dir=str(root / "staging"), dead_letter_dir=str(root / "dlq"), **kw
    )


def write_mixed(path: Path, good: list[dict[str, Any]], bad: list[bytes], every: int = 7) -> tuple[Path, list[int]]:
    """Good documents with the bad lines spread among them; the bad lines' 1-based numbers."""
    lines = [orjson.dumps(d) for d in good]
    numbers = []
    for i, line in enumerate(bad):
        at = min(3 + i * every, len(lines))
        lines.insert(at, line)
        numbers.append(at + 1)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, numbers


def run_all(store: JobStore, targets: dict[str, NodeTarget], settings: PipelineSettings) -> list[Exception]:
    errors: list[Exception] = []
    while (lease := store.claim(["dump_import"], "w", settings.lease_ttl)) is not None:
        try:
            process_dump_chunk(store, lease, targets, settings)
        except InvalidDocumentError as exc:
            errors.append(exc)
    return errors


def dead_letters(root: Path, parent_id: str) -> list[dict[str, Any]]:
    return [
        orjson.loads(x)
        for f in sorted((root / "dlq" / parent_id).glob("*.ndjson"))
        for x in f.read_bytes().splitlines()
    ]


def check_skip(
    root: Path, store: JobStore, targets: dict[str, NodeTarget], topo: Topology, uid: str,
    good: list[dict[str, Any]], bad: list[bytes], reasons: list[str], settings: PipelineSettings,
) -> list[dict[str, Any]]:
    dump, numbers = write_mixed(root / f"{uid}.ndjson", good, bad)
    request = DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id", on_invalid_document="skip")
    plan = plan_dump_import(store, request, topo, targets, settings)
    assert run_all(store, targets, settings) == []
    summary = store.parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert summary.progress["invalid_documents"] == len(bad)
    assert summary.progress["docs_routed"] == len(good)
    expected = expected_placement(good, topo)
    assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, uid))
    dead = dead_letters(root, plan.parent.id)
    data = dump.read_bytes()
    assert sorted(r["line"] for r in dead) == sorted(numbers)
    for rec in dead:
        assert rec["dump"] == str(dump)
        # The offset points at the start of the recorded line, and the raw text is that line.
        assert data.count(b"\n", 0, rec["byte_offset"]) + 1 == rec["line"]
        line = data[rec["byte_offset"] :].split(b"\n", 1)[0]
        assert line == bad[numbers.index(rec["line"])]
        assert any(r in rec["reason"] for r in reasons), rec["reason"]
    return dead


def check_fail(
    root: Path, store: JobStore, targets: dict[str, NodeTarget], topo: Topology, uid: str,
    good: list[dict[str, Any]], bad: bytes, reason: str, settings: PipelineSettings,
) -> None:
    dump, (number,) = write_mixed(root / f"{uid}.ndjson", good, [bad])
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id"), topo, targets, settings)
    errors = run_all(store, targets, settings)
    assert len(errors) == 1, "a document's error is permanent: one attempt, no retry"
    message = str(errors[0])
    offset = len(b"".join(line + b"\n" for line in dump.read_bytes().split(b"\n")[: number - 1]))
    assert f"line {number}, byte offset {offset}" in message
    assert reason in message and "--on-invalid skip" in message
    (chunk,) = store.children(plan.parent.id)
    assert chunk.state == JobState.FAILED and chunk.attempts == 1
    assert store.get(plan.parent.id).state == JobState.FAILED


# -- local nodes ------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> Any:
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    topo = local_topology(tmp_path / "nodes", shards=16, groups=2, nodes_per_group=2)
    yield tmp_path, store, topo, open_targets(topo)
    store.close()


def test_local_skip_dead_letters_what_every_target_refuses_and_keeps_the_rest(local: Any) -> None:
    root, store, topo, targets = local
    good = make_docs(60, seed=3)
    check_skip(
        root, store, targets, topo, "mixed", good, [b for b, _ in ROUTER_CATCHES], [r for _, r in ROUTER_CATCHES],
        settings_for(root, batch_size=16),
    )


@pytest.mark.parametrize(("bad", "reason"), ROUTER_CATCHES, ids=["dup", "escaped-dup", "deep300", "deep100k", "vectors"])
def test_local_fail_names_the_line_and_never_retries(local: Any, bad: bytes, reason: str) -> None:
    root, store, topo, targets = local
    check_fail(root, store, targets, topo, "failing", make_docs(20, seed=4), bad, reason, settings_for(root))


def test_local_store_refuses_what_meilisearch_refuses_and_writes_the_rest(local: Any) -> None:
    """The store's own check (documents that did not come through the router: a reshard, a
    direct write) refuses exactly the bad documents and writes every other one."""
    _, _, _, targets = local
    target = next(iter(targets.values()))
    target.ensure_index("direct", "id", None)
    lines = [b'{"_miroir_shard":0,"id":"ok1"}', b'{"_miroir_shard":0,"id":"x","id":"y"}', b'{"_miroir_shard":0,"id":"ok2"}']
    with pytest.raises(DocumentsRefused) as caught:
        target.write_routed("direct", "id", lines, ["ok1", "y", "ok2"], [0, 0, 0])
    assert [r.position for r in caught.value.refused] == [1]
    assert "appears more than once" in caught.value.refused[0].message
    held = sorted(orjson.loads(d)["id"] for d in target.iter_documents("direct"))
    assert held == ["ok1", "ok2"]


# -- a real Meilisearch fleet ---------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path, meili_fleet: Any, meili_topology: Any, meili_index_uid: str) -> Any:
    procs = meili_fleet(3)
    topo = meili_topology(procs, shards=8, replication_factor=1, groups=[[0], [1, 2]])
    targets = open_targets(topo)
    for target in targets.values():  # the node validates _geo only once it is filterable
        target.ensure_index(meili_index_uid, "id", {"filterableAttributes": ["_geo"]})
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    yield tmp_path, store, topo, targets, meili_index_uid
    store.close()


@pytest.mark.meilisearch
def test_fleet_skip_isolates_refused_documents_and_lands_every_good_one(fleet: Any) -> None:
    root, store, topo, targets, uid = fleet
    good = make_docs(40, seed=5)
    bad = [GEO_BAD, HUGE_NUMBER, *(b for b, _ in ROUTER_CATCHES[:3])]
    dead = check_skip(
        root, store, targets, topo, uid, good, bad,
        ["invalid_document_geo_field", "Could not parse latitude", "number out of range",
         *(r for _, r in ROUTER_CATCHES)],
        settings_for(root, batch_size=20),
    )  # fmt: skip
    geo = next(r for r in dead if r["raw"] == GEO_BAD.decode())
    # The node's own words, the node that refused it, and its error code.
    assert geo["code"] == "invalid_document_geo_field"
    assert geo["node"] in {n.id for n in topo.all_nodes()}
    assert "latitude" in geo["reason"].lower()
    huge = next(r for r in dead if r["raw"] == HUGE_NUMBER.decode())
    assert huge["code"] == "internal" and "number out of range" in huge["reason"], huge
    assert huge["node"] in {n.id for n in topo.all_nodes()}


@pytest.mark.meilisearch
@pytest.mark.parametrize(("bad", "reason"), [(GEO_BAD, "latitude"), (HUGE_NUMBER, "number out of range")], ids=["geo", "huge-number"])
def test_fleet_fail_names_the_line_and_the_nodes_message(fleet: Any, bad: bytes, reason: str) -> None:
    root, store, topo, targets, uid = fleet
    check_fail(root, store, targets, topo, uid, make_docs(20, seed=6), bad, reason, settings_for(root))


@pytest.mark.meilisearch
def test_fleet_skip_dead_letters_a_node_share_whose_every_document_is_refused(fleet: Any) -> None:
    """Both documents of the dump go to one node and it refuses each: two invalid documents
    under the policy, not a node failure retried until the chunk gives up."""
    root, store, topo, targets, uid = fleet
    check_skip(
        root, store, targets, topo, uid, [], [GEO_BAD, HUGE_NUMBER],
        ["invalid_document_geo_field", "Could not parse latitude", "number out of range"],
        settings_for(root, batch_size=64),
    )  # fmt: skip


@pytest.mark.meilisearch
def test_a_chunk_whose_documents_nodes_refused_names_the_file_they_went_to(fleet: Any) -> None:
    """Every invalid document of the chunk was refused by a node, none by the router: the
    chunk's metadata and its has_documents check name the file those went to, not only the
    router's (empty) one."""
    from miroir_pipeline.dagster.checks import has_documents_result
    from miroir_pipeline.dagster.names import MiroirNames

    root, store, topo, targets, uid = fleet
    settings = settings_for(root, batch_size=64)
    dump = root / f"{uid}.ndjson"
    dump.write_bytes(GEO_BAD + b"\n" + HUGE_NUMBER + b"\n")
    request = DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id", on_invalid_document="skip")
    plan_dump_import(store, request, topo, targets, settings)
    lease = store.claim(["dump_import"], "w", settings.lease_ttl)
    assert lease is not None
    report = process_dump_chunk(store, lease, targets, settings)
    assert report.invalid_documents == 2 and report.documents == 0
    meta = report.as_metadata()
    refused = Path(meta["refused_dead_letter"])
    assert refused.name == f"{lease.job_id}.refused.ndjson" and len(refused.read_bytes().splitlines()) == 2
    assert Path(meta["dead_letter"]).read_bytes() == b"", "the router found nothing invalid"
    names = MiroirNames()
    check = has_documents_result(
        names, names.chunk_asset_key("dump_import"), f"chunk {lease.job_id}", documents=report.documents, invalid_documents=report.invalid_documents,
        dead_letter=report.dead_letter, refused_dead_letter=report.refused_dead_letter,
    )  # fmt: skip
    assert not check.passed and f"{refused} (refused by a node)" in str(check.description)


@pytest.mark.meilisearch
def test_fleet_skip_counts_identical_refused_lines_each_at_its_own_line(fleet: Any) -> None:
    """The same bad line twice in one batch is two documents: two dead letters at two lines,
    and the counts (routed, invalid, per node) agree with them."""
    root, store, topo, targets, uid = fleet
    dead = check_skip(
        root, store, targets, topo, uid, make_docs(30, seed=8), [GEO_BAD, GEO_BAD, HUGE_NUMBER, HUGE_NUMBER],
        ["invalid_document_geo_field", "Could not parse latitude", "number out of range"],
        settings_for(root, batch_size=64),
    )  # fmt: skip
    assert len({r["line"] for r in dead}) == 4


@pytest.mark.meilisearch
def test_fleet_skip_places_a_refused_document_at_its_own_line_not_inside_an_earlier_one(fleet: Any) -> None:
    """An earlier good document holds the refused one's text inside a field: the dead letter
    names the refused document's own line, and the good one lands."""
    root, store, topo, targets, uid = fleet
    decoy = {"wrapper": orjson.loads(GEO_BAD), "id": "innocent"}
    assert GEO_BAD[1:] in orjson.dumps(decoy)
    check_skip(
        root, store, targets, topo, uid, [decoy, *make_docs(20, seed=9)], [GEO_BAD],
        ["invalid_document_geo_field", "Could not parse latitude"], settings_for(root, batch_size=64),
    )  # fmt: skip


@pytest.fixture
def disagreeing_replicas(tmp_path: Path, meili_fleet: Any, meili_topology: Any, meili_index_uid: str) -> Any:
    """Two nodes holding every shard (RF 2): only the first has ``_geo`` filterable, so only
    it checks a document's ``_geo``."""
    procs = meili_fleet(2)
    topo = meili_topology(procs, shards=4, replication_factor=2, groups=[[0, 1]])
    targets = open_targets(topo)
    first, second = (n.id for n in topo.all_nodes())
    targets[first].ensure_index(meili_index_uid, "id", {"filterableAttributes": ["_geo"]})
    targets[second].ensure_index(meili_index_uid, "id")
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    yield tmp_path, store, topo, targets, meili_index_uid, first, second
    store.close()


@pytest.mark.meilisearch
@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_replicas_that_disagree_about_a_document_fail_the_chunk_naming_both(disagreeing_replicas: Any, policy: str) -> None:
    """One replica refuses the document, the other wrote it: a dead letter would leave it
    searchable on one node of its shard. The chunk fails for good, naming the line and both
    nodes, and nothing is dead-lettered."""
    root, store, topo, targets, uid, first, second = disagreeing_replicas
    dump, (number,) = write_mixed(root / f"{uid}.ndjson", make_docs(12, seed=12), [GEO_BAD])
    request = DumpImportRequest(uri=str(dump), index_uid=uid, primary_key="id", on_invalid_document=policy)
    settings = settings_for(root)
    plan = plan_dump_import(store, request, topo, targets, settings)
    lease = store.claim(["dump_import"], "w", settings.lease_ttl)
    assert lease is not None
    with pytest.raises(ReplicasDisagree) as caught:
        process_dump_chunk(store, lease, targets, settings)
    message = str(caught.value)
    offset = len(b"".join(line + b"\n" for line in dump.read_bytes().split(b"\n")[: number - 1]))
    assert f"line {number}, byte offset {offset}" in message
    assert f"node {first} refused it" in message and "latitude" in message
    assert f"node(s) {second} wrote it" in message and "retry the chunk" in message
    (chunk,) = store.children(plan.parent.id)
    assert chunk.state == JobState.FAILED and chunk.attempts == 1
    assert store.claim(["dump_import"], "w", settings.lease_ttl) is None, "failed for good, not re-queued"
    assert dead_letters(root, plan.parent.id) == []


# -- a document larger than a node's payload limit -------------------------------------------


@pytest.fixture
def small_payload_fleet(tmp_path: Path, meili_fleet: Any, meili_topology: Any, meili_index_uid: str) -> Any:
    """Two Meilisearch nodes whose topology says they take payloads of at most 4,096 bytes."""
    procs = meili_fleet(2)
    topo = meili_topology(procs, shards=8, replication_factor=1, groups=[[0, 1]], payload_limit_bytes=4096)
    targets = open_targets(topo)
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    yield tmp_path, store, topo, targets, meili_index_uid
    store.close()


#: 4,090 bytes as it stands in the dump: under max_document_bytes, but once tagged with its
#: shard and ended by a newline it is more than a 4,096-byte payload.
TOO_BIG_FOR_THE_NODE = b'{"id":"big","t":"' + b"x" * 4071 + b'"}'
PAYLOAD_REASON = "payload_limit_bytes"


@pytest.mark.meilisearch
def test_fleet_skip_dead_letters_a_document_over_a_nodes_payload_limit(small_payload_fleet: Any) -> None:
    """Such a document can never be sent: it is an invalid document at its own line (not a
    node failure retried until the chunk gives up), and every other document lands."""
    assert len(TOO_BIG_FOR_THE_NODE) == 4090
    root, store, topo, targets, uid = small_payload_fleet
    (dead,) = check_skip(
        root, store, targets, topo, uid, make_docs(30, seed=9), [TOO_BIG_FOR_THE_NODE], [PAYLOAD_REASON],
        settings_for(root, batch_size=8),
    )  # fmt: skip
    assert "4090 bytes" in dead["reason"] and "4096" in dead["reason"], dead["reason"]


@pytest.mark.meilisearch
def test_fleet_fail_names_the_line_of_a_document_over_a_nodes_payload_limit(small_payload_fleet: Any) -> None:
    root, store, topo, targets, uid = small_payload_fleet
    check_fail(root, store, targets, topo, uid, make_docs(20, seed=10), TOO_BIG_FOR_THE_NODE, PAYLOAD_REASON, settings_for(root))
