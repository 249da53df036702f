"""Pipeline settings shared by the CLI, the worker and the Dagster resources (validated at the edge)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from miroir_pipeline.fleet.topology import Topology, default_topology, load_topology
from miroir_pipeline.queue.contract import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_ATTEMPTS,
)
from miroir_pipeline.util.home import default_home
from miroir_pipeline.util.sizes import parse_size

__all__ = ["PipelineSettings", "default_home", "resolve_topology"]


OnInvalid = Literal["fail", "skip"]


class PipelineSettings(BaseModel):
    """How chunks are processed; every field has an embedded default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_roots: list[str] = Field(default_factory=lambda: _env_list("MIROIR_ALLOWED_ROOTS", [os.getcwd()]))
    staging_dir: str = Field(default_factory=lambda: os.environ.get("MIROIR_STAGING_DIR", str(default_home() / "staging")))
    dead_letter_dir: str = Field(default_factory=lambda: os.environ.get("MIROIR_DEAD_LETTER_DIR", str(default_home() / "dead-letter")))
    chunk_size_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    #: Routed documents a chunk holds at most: the batch being filled plus the window of
    #: batches handed to the nodes and not yet acknowledged.
    memory_buffer_bytes: int = Field(default=128 * 1024 * 1024, ge=64 * 1024)
    read_block_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)
    #: A batch is handed to the nodes at this many documents or :attr:`batch_bytes`, whichever
    #: comes first; batches are sized in bytes by default (a node's payload is one batch).
    batch_size: int = Field(default=1_000_000, ge=1)
    #: Routed bytes per batch (all nodes together); default a quarter of the memory buffer,
    #: the rest being the window of batches in flight.
    batch_bytes: int | None = Field(default=None, ge=4096)
    max_document_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    on_invalid_document: OnInvalid = "fail"
    lease_ttl: float = Field(default=DEFAULT_LEASE_TTL, gt=0)
    heartbeat_interval: float = Field(default=DEFAULT_HEARTBEAT_INTERVAL, gt=0)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)

    @property
    def effective_batch_bytes(self) -> int:
        return min(self.batch_bytes or self.memory_buffer_bytes // 4, self.memory_buffer_bytes)

    @property
    def window_bytes(self) -> int:
        """Bytes of routed batches that may await the nodes' acknowledgement besides the newest."""
        return max(self.memory_buffer_bytes - self.effective_batch_bytes, 0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> PipelineSettings:
        """Defaults, then ``MIROIR_<FIELD>`` environment variables, then explicit overrides.

        Sizes accept units (``MIROIR_CHUNK_SIZE_BYTES=64MiB``); ``MIROIR_ALLOWED_ROOTS`` is
        comma-separated (roots may be URIs such as ``s3://bucket/dumps/``).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            raw = env.get(f"MIROIR_{name.upper()}")
            if raw is None or name in ("allowed_roots", "staging_dir", "dead_letter_dir"):
                continue
            if name.endswith("_bytes"):
                values[name] = parse_size(raw)
            elif info.annotation is int:
                values[name] = int(raw)
            elif info.annotation is float:
                values[name] = float(raw)
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if not raw:
        return default
    return [p.strip() for p in raw.split(",") if p.strip()]


def resolve_topology(path: str | None = None) -> Topology:
    """The topology file given, else ``$MIROIR_TOPOLOGY``, else the 3-node local default."""
    path = path or os.environ.get("MIROIR_TOPOLOGY")
    return load_topology(path) if path else default_topology(default_home())
