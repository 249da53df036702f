"""Reading from the first replica that answers: a node that is down is passed over (the read is
retryable when none answers), a refusal every node makes as configured (a wrong key) is not."""

from __future__ import annotations

import pytest

from miroir_pipeline.fleet.replica_reads import from_first_replica
from miroir_pipeline.fleet.targets.base import NodeTarget, RequestRefused, TargetError

NODES = ["a", "b"]


def _read(errors: dict[str, TargetError]) -> object:
    def read(node: str, _target: NodeTarget) -> str:
        if node in errors:
            raise errors[node]
        return f"page from {node}"

    return read


def test_the_first_replica_that_answers_serves_the_read() -> None:
    down = TargetError("node a: connection refused", node_id="a", retryable=True)
    assert from_first_replica(NODES, {"a": None, "b": None}, _read({"a": down}), "shard 3") == ("b", "page from b")  # type: ignore[arg-type]


def test_a_refusal_by_every_node_is_raised_as_a_refusal() -> None:
    refused = {n: RequestRefused(f"node {n}: HTTP 401; check the node's API key", node_id=n, status=401) for n in NODES}
    with pytest.raises(RequestRefused, match=r"shard 3: every node holding it refused the request.*HTTP 401") as info:
        from_first_replica(NODES, {"a": None, "b": None}, _read(refused), "shard 3")  # type: ignore[arg-type]
    assert info.value.status == 401 and not info.value.retryable


def test_a_refusal_beside_a_node_that_is_down_stays_retryable() -> None:
    errors = {
        "a": RequestRefused("node a: HTTP 403", node_id="a", status=403),
        "b": TargetError("node b: connection refused", node_id="b", retryable=True),
    }
    with pytest.raises(TargetError) as info:
        from_first_replica(NODES, {"a": None, "b": None}, _read(errors), "shard 3")  # type: ignore[arg-type]
    assert not isinstance(info.value, RequestRefused) and info.value.retryable
