"""Fleet topology: shard count, replication factor and replica groups of nodes.

Loaded from YAML (or the same structure as resource config) and validated before any job
is queued; every error names the offending field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["Group", "Node", "Topology", "TopologyError", "default_topology", "load_topology"]

_SCHEMES = ("http://", "https://", "local://")
#: Meilisearch's default ``--http-payload-size-limit`` is "100 MB", decimal: 1.21 refuses a body
#: of 100,006,010 bytes with ``payload_too_large``, gzip'd or not (the limit is on what it reads
#: after decompressing).
DEFAULT_PAYLOAD_LIMIT = 100_000_000


class TopologyError(ValueError):
    """A topology that cannot be used; the message names the field and what to change."""


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    url: str
    #: Name of the environment variable that holds this node's API key (never the key itself).
    api_key_env: str | None = None
    #: Largest request body the node accepts (Meilisearch ``--http-payload-size-limit``).
    payload_limit_bytes: int = Field(default=DEFAULT_PAYLOAD_LIMIT, gt=1024)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith("local://") and "@" in url.split("://", 1)[-1].split("/", 1)[0]:
            # Said without echoing the URL: the part before '@' is a password.
            raise ValueError(
                "URL carries credentials (user:password@host); Meilisearch takes its key in a "
                "header: drop them from the URL and name the key's environment variable in api_key_env"
            )
        if not url.startswith(_SCHEMES):
            raise ValueError(
                f"unknown URL scheme in {url!r}; use http://, https:// (Meilisearch) or local://PATH"
            )
        if url.startswith("local://") and not url[len("local://"):]:
            raise ValueError("local:// URL needs a path, e.g. local:///var/lib/miroir/nodes/node-0")
        return url.rstrip("/") if not url.startswith("local://") else url

    @property
    def kind(self) -> Literal["meilisearch", "local"]:
        return "local" if self.url.startswith("local://") else "meilisearch"

    @property
    def local_path(self) -> Path:
        if self.kind != "local":
            raise TopologyError(f"node {self.id} is not a local node store ({self.url})")
        return Path(self.url[len("local://"):])

    def api_key(self) -> str | None:
        """The node's API key, read from the environment at use time."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def _place(url: str) -> str:
    """Where a node URL points, spelled one way: a local store's normalised path, or a server's
    scheme and host in lower case with its path."""
    if url.startswith("local://"):
        return "local://" + os.path.normpath(url[len("local://"):])
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=0)
    nodes: list[Node] = Field(min_length=1)


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shards: int = Field(ge=1, le=2**32 - 1)
    replication_factor: int = Field(default=1, ge=1)
    groups: list[Group] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Topology:
        group_ids = [g.id for g in self.groups]
        dup_groups = sorted({g for g in group_ids if group_ids.count(g) > 1})
        if dup_groups:
            raise ValueError(f"groups: duplicate group id(s) {dup_groups}")
        seen: dict[str, int] = {}
        for g in self.groups:
            for n in g.nodes:
                if n.id in seen:
                    raise ValueError(
                        f"groups: node id {n.id!r} appears in group {seen[n.id]} and group {g.id}; node ids must be unique"
                    )
                seen[n.id] = g.id
            if self.replication_factor > len(g.nodes):
                raise ValueError(
                    f"replication_factor: {self.replication_factor} is larger than group {g.id}, "
                    f"which has {len(g.nodes)} node(s)"
                )
        places: dict[str, str] = {}
        for n in self.all_nodes():
            place = _place(n.url)
            if place in places:
                raise ValueError(
                    f"groups: nodes {places[place]!r} and {n.id!r} have the same URL ({n.url}); "
                    "each node is a server (or local store) of its own, so one would hold both "
                    "nodes' shards and the replicas meant to be apart would be one copy"
                )
            places[place] = n.id
        return self

    def all_nodes(self) -> list[Node]:
        """Every node, groups in id order, nodes in file order."""
        return [n for g in sorted(self.groups, key=lambda g: g.id) for n in g.nodes]

    def node(self, node_id: str) -> Node:
        for n in self.all_nodes():
            if n.id == node_id:
                return n
        raise TopologyError(f"unknown node {node_id!r}; known nodes: {[n.id for n in self.all_nodes()]}")

    @classmethod
    def parse(cls, data: Any, source: str = "topology") -> Topology:
        """Validate plain data (YAML/JSON/resource config) into a topology, naming bad fields."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                loc = _format_loc(err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"{loc}: {msg}" if loc else msg)
            raise TopologyError(f"{source}: invalid topology: " + "; ".join(problems)) from None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and validate a topology YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read topology file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"{p}: not valid YAML: {exc}") from None
    return Topology.parse(data, source=str(p))


def default_topology(base_dir: str | os.PathLike[str] = ".miroir", shards: int = 64) -> Topology:
    """The embedded default: one group of three local node stores under ``BASE/nodes``."""
    root = Path(base_dir).resolve() / "nodes"
    return Topology(
        shards=shards,
        replication_factor=1,
        groups=[Group(id=0, nodes=[Node(id=f"node-{i}", url=f"local://{root / f'node-{i}'}") for i in range(3)])],
    )
