"""Topology loading refuses bad fleets before any job is queued, naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from miroir_pipeline.fleet.topology import Topology, TopologyError, default_topology, load_topology

VALID_YAML = """\
shards: 64
replication_factor: 1
groups:
  - id: 0
    nodes:
      - {id: node-0, url: "http://127.0.0.1:7700", api_key_env: MEILI_MASTER_KEY}
      - {id: node-1, url: "local:///var/lib/miroir/nodes/node-1"}
"""

VALID: dict[str, Any] = {
    "shards": 8,
    "replication_factor": 2,
    "groups": [
        {
            "id": 0,
            "nodes": [
                {"id": "a", "url": "http://127.0.0.1:7700"},
                {"id": "b", "url": "https://h:7700/"},
            ],
        },
        {
            "id": 1,
            "nodes": [{"id": "c", "url": "local:///x/c"}, {"id": "d", "url": "local:///x/d"}],
        },
    ],
}


def test_valid_yaml_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(VALID_YAML)
    topo = load_topology(path)
    assert topo.shards == 64
    assert topo.replication_factor == 1
    assert [n.id for n in topo.all_nodes()] == ["node-0", "node-1"]
    n0, n1 = topo.all_nodes()
    assert n0.kind == "meilisearch" and n0.url == "http://127.0.0.1:7700"
    assert n1.kind == "local" and n1.local_path == Path("/var/lib/miroir/nodes/node-1")
    monkeypatch.setenv("MEILI_MASTER_KEY", "k")
    assert n0.api_key() == "k"
    assert n1.api_key() is None
    assert topo.node("node-1") is n1


def test_valid_dict_parses_and_orders_groups() -> None:
    data = copy.deepcopy(VALID)
    data["groups"].reverse()
    topo = Topology.parse(data)
    assert [n.id for n in topo.all_nodes()] == ["a", "b", "c", "d"]
    assert topo.node("b").url == "https://h:7700"  # trailing slash dropped


def _broken(path: list[str | int], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    target: Any = data
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "fragments"),
    [
        (["shards"], 0, ["shards", "greater than or equal to 1"]),
        (["shards"], -3, ["shards"]),
        (["replication_factor"], 3, ["replication_factor", "3", "group 0", "2 node"]),
        (["groups", 1, "nodes", 0, "id"], "a", ["groups", "'a'", "unique"]),
        (["groups", 1, "id"], 0, ["groups", "duplicate group id", "[0]"]),
        (
            ["groups", 0, "nodes", 1, "url"],
            "ftp://h",
            ["groups[0].nodes[1].url", "unknown URL scheme", "ftp://h"],
        ),
        (["groups", 0, "nodes", 1, "url"], "local://", ["groups[0].nodes[1].url", "local://"]),
        (["shards"], _DELETE, ["shards", "required"]),
        (["groups"], _DELETE, ["groups", "required"]),
        (["groups", 0, "nodes", 0, "url"], _DELETE, ["groups[0].nodes[0].url", "required"]),
        (["groups", 0, "nodes"], [], ["groups[0].nodes"]),
        (["groups"], [], ["groups"]),
        (["surprise"], 1, ["surprise"]),
        # Two nodes on one server (or store), spelled differently: their replicas would be one copy.
        (["groups", 0, "nodes", 1, "url"], "http://127.0.0.1:7700/", ["'a' and 'b'", "same URL"]),
        (["groups", 1, "nodes", 1, "url"], "local:///x/./c", ["'c' and 'd'", "same URL"]),
        (["groups", 1, "nodes", 1, "url"], "http://127.0.0.1:7700", ["'a' and 'd'", "same URL"]),
    ],
)
def test_invalid_topology_names_the_field(
    path: list[str | int], value: Any, fragments: list[str]
) -> None:
    with pytest.raises(TopologyError) as info:
        Topology.parse(_broken(path, value), source="fleet.yaml")
    message = str(info.value)
    assert message.startswith("fleet.yaml: invalid topology")
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)


@pytest.mark.parametrize("url", ["http://admin:hunter2@h:7700", "https://hunter2@h", "ftp://u:hunter2@h"])
def test_url_with_credentials_is_refused_without_echoing_them(url: str) -> None:
    data = _broken(["groups", 0, "nodes", 1, "url"], url)
    with pytest.raises(TopologyError) as info:
        Topology.parse(data, source="fleet.yaml")
    message = str(info.value)
    assert "groups[0].nodes[1].url" in message and "api_key_env" in message
    assert "hunter2" not in message


def test_at_sign_in_a_path_is_not_credentials() -> None:
    data = _broken(["groups", 0, "nodes", 1, "url"], "http://h:7700/proxy/@team")
    assert Topology.parse(data).node("b").url == "http://h:7700/proxy/@team"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology file"):
        load_topology(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: [1, 2\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load_topology(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(TopologyError, match=str(empty)):
        load_topology(empty)


def test_unknown_node_is_refused() -> None:
    with pytest.raises(TopologyError, match="unknown node 'zz'"):
        Topology.parse(VALID).node("zz")


def test_local_path_of_remote_node_is_refused() -> None:
    with pytest.raises(TopologyError, match="not a local node store"):
        _ = Topology.parse(VALID).node("a").local_path


def test_default_topology(tmp_path: Path) -> None:
    topo = default_topology(tmp_path / ".miroir")
    assert topo.shards == 64
    assert topo.replication_factor == 1
    assert len(topo.groups) == 1
    nodes = topo.all_nodes()
    assert [n.id for n in nodes] == ["node-0", "node-1", "node-2"]
    for i, n in enumerate(nodes):
        assert n.kind == "local"
        assert n.local_path == (tmp_path / ".miroir" / "nodes" / f"node-{i}").resolve()
    assert default_topology(tmp_path, shards=8).shards == 8


def test_topology_is_immutable() -> None:
    topo = Topology.parse(VALID)
    with pytest.raises(ValueError):
        topo.shards = 3  # type: ignore[misc]
