"""Shared helpers for import tests: make dumps, predict placement from the routing formula,
read back what every node holds."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from miroir_pipeline.fleet.routing import SHARD_FIELD, shard_for_key, write_targets
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.topology import Topology


def make_docs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """String and integer ids, nested fields and unicode."""
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = []
    for i in range(n):
        doc_id: int | str = i if i % 2 else f"doc_{i}-{rng.randrange(10**6)}"
        docs.append(
            {"id": doc_id, "title": f"títle {i} ☃", "nested": {"a": [i, i * 2], "b": {"c": "x" * rng.randrange(50)}}}
        )
    return docs


def write_dump(path: Path, docs: list[dict[str, Any]], *, crlf: bool = False) -> Path:
    nl = b"\r\n" if crlf else b"\n"
    path.write_bytes(b"".join(orjson.dumps(d) + nl for d in docs))
    return path


def expected_placement(docs: list[dict[str, Any]], topology: Topology, pk: str = "id") -> dict[str, dict[str, dict[str, Any]]]:
    """node id → {primary key text → document with its _miroir_shard}, by Miroir's routing formula."""
    out: dict[str, dict[str, dict[str, Any]]] = {n.id: {} for n in topology.all_nodes()}
    for doc in docs:
        shard = shard_for_key(doc[pk], topology.shards)
        for node in write_targets(shard, topology):
            out[node][str(doc[pk])] = {**doc, SHARD_FIELD: shard}
    return out


def actual_placement(targets: Mapping[str, NodeTarget], index_uid: str, pk: str = "id") -> dict[str, dict[str, dict[str, Any]]]:
    """What every node holds, failing on a primary key held twice by one node."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for node_id, target in targets.items():
        held: dict[str, dict[str, Any]] = {}
        if target.index_exists(index_uid):
            for raw in target.iter_documents(index_uid):
                doc = orjson.loads(raw)
                key = str(doc[pk])
                assert key not in held, f"{node_id} holds {key} twice"
                held[key] = doc
        out[node_id] = held
    return out


def assert_exact_placement(expected: dict[str, dict[str, dict[str, Any]]], actual: dict[str, dict[str, dict[str, Any]]]) -> None:
    for node in expected:
        missing = expected[node].keys() - actual[node].keys()
        extra = actual[node].keys() - expected[node].keys()
        assert not missing, f"{node} misses {len(missing)} documents, e.g. {sorted(missing)[:5]}"
        assert not extra, f"{node} holds {len(extra)} documents it should not, e.g. {sorted(extra)[:5]}"
        wrong = [k for k, d in expected[node].items() if actual[node][k] != d]
        assert not wrong, f"{node}: {len(wrong)} documents differ, e.g. {wrong[:3]}: {actual[node][wrong[0]]} != {expected[node][wrong[0]]}"


def local_topology(root: Path, *, shards: int = 64, groups: int = 1, nodes_per_group: int = 3, rf: int = 1) -> Topology:
    return Topology.parse(
        {
            "shards": shards,
            "replication_factor": rf,
            "groups": [
                {"id": g, "nodes": [{"id": f"g{g}-n{i}", "url": f"local://{root}/g{g}-n{i}"} for i in range(nodes_per_group)]}
                for g in range(groups)
            ],
        }
    )
