"""A worker keeps one target per node for its whole life (connection reuse), but a node is the
same only with all of its settings: after an operator corrects a node in the topology and
plans again, the running workers write with the corrected settings."""

from __future__ import annotations

from typing import Any

import pytest

from miroir_pipeline.dagster.resources import targets_for
from miroir_pipeline.fleet.topology import Topology


def topology(**node: Any) -> Topology:
    return Topology.parse(
        {
            "shards": 8,
            "replication_factor": 1,
            # Port 9 (discard): nothing is sent; a target opens no connection until it writes.
            "groups": [{"id": 0, "nodes": [{"id": "cache-test-n0", "url": "http://127.0.0.1:9", **node}]}],
        }
    )


def test_a_node_with_changed_settings_gets_a_target_that_applies_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_TEST_OTHER_KEY", "not-a-real-key")
    planned = targets_for(topology(payload_limit_bytes=1_000_000))["cache-test-n0"]
    assert targets_for(topology(payload_limit_bytes=1_000_000))["cache-test-n0"] is planned, "reused"
    corrected = targets_for(topology(payload_limit_bytes=16_384))["cache-test-n0"]
    assert corrected.payload_limit_bytes == 16_384
    assert planned.payload_limit_bytes == 1_000_000
    renamed_key = targets_for(topology(payload_limit_bytes=16_384, api_key_env="CACHE_TEST_OTHER_KEY"))
    assert renamed_key["cache-test-n0"] is not corrected
