"""Miroir-compatible document routing: the one place that decides shard and node placement.

Byte-compatible with Miroir's Rust router (twox-hash ``XxHash64::with_seed(0)`` fed through
Rust's ``Hash`` trait): ``str`` hashes its UTF-8 bytes followed by a ``0xFF`` terminator and
``u32`` hashes its 4 little-endian bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import mod
from typing import TYPE_CHECKING

import xxhash

if TYPE_CHECKING:
    from miroir_pipeline.fleet.topology import Topology

__all__ = [
    "SHARD_FIELD",
    "InvalidPrimaryKey",
    "Router",
    "assign_shard_in_group",
    "negative_zero_key",
    "primary_key_text",
    "score",
    "shard_for_key",
    "write_targets",
]

#: Reserved document field carrying the shard id; set by the pipeline, never trusted from input.
SHARD_FIELD = "_miroir_shard"

_STR_TERMINATOR = b"\xff"
_U32_MASK = 0xFFFF_FFFF
_MAX_KEY_BYTES = 511
_KEY_RE = re.compile(rb"[A-Za-z0-9_-]{1,511}")
#: The integer ids Meilisearch accepts: signed or unsigned 64-bit.
I64_MIN = -(2**63)
U64_MAX = 2**64 - 1

_xxh64 = xxhash.xxh64_intdigest


def shard_for_key(pk: str | int, shards: int) -> int:
    """Shard of a primary key: ``xxh64(utf8(pk) + 0xFF, seed=0) % shards``.

    A pure hash: any string is accepted; an integer hashes as its decimal text because
    Meilisearch treats ``1`` and ``"1"`` as the same document.
    """
    text = pk if isinstance(pk, str) else str(int(pk))
    return _xxh64(text.encode("utf-8") + _STR_TERMINATOR) % shards


def shard_for_key_bytes(pk_utf8: bytes, shards: int) -> int:
    """:func:`shard_for_key` for a key already encoded as UTF-8 (the hot path's form)."""
    return _xxh64(pk_utf8 + _STR_TERMINATOR) % shards


def score(shard_id: int, node_id: str) -> int:
    """Rendezvous score of a node for a shard: ``xxh64(u32_le(shard) + utf8(node) + 0xFF)``."""
    return _xxh64(
        (shard_id & _U32_MASK).to_bytes(4, "little") + node_id.encode("utf-8") + _STR_TERMINATOR
    )


def assign_shard_in_group(shard_id: int, group_nodes: Sequence[str], rf: int) -> list[str]:
    """The ``rf`` nodes of one replica group that own a shard: highest score first, ties by id."""
    ranked = sorted(group_nodes, key=lambda node: (-score(shard_id, node), node))
    return ranked[:rf]


def write_targets(shard_id: int, topology: Topology) -> list[str]:
    """Every node a shard is written to: its owners in each replica group, groups in id order."""
    targets: list[str] = []
    for group in sorted(topology.groups, key=lambda g: g.id):
        targets.extend(
            assign_shard_in_group(shard_id, [n.id for n in group.nodes], topology.replication_factor)
        )
    return targets


class InvalidPrimaryKey(ValueError):
    """A document's primary key value breaks Meilisearch's document id rules."""


def primary_key_text(value: object) -> bytes:
    """Validate a decoded primary key value and return the UTF-8 text it is hashed by.

    Meilisearch accepts an integer, or a string of ``[A-Za-z0-9_-]`` of 1-511 bytes.
    """
    if isinstance(value, bool):
        raise InvalidPrimaryKey(f"primary key is a boolean ({str(value).lower()}); expected an integer or a string")
    if isinstance(value, int):
        if value < I64_MIN or value > U64_MAX:
            raise InvalidPrimaryKey(f"primary key integer {value} is outside the 64-bit range")
        return str(value).encode("ascii")
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        if not raw:
            raise InvalidPrimaryKey("primary key is an empty string")
        if len(raw) > _MAX_KEY_BYTES:
            raise InvalidPrimaryKey(
                f"primary key is {len(raw)} bytes long; Meilisearch allows at most {_MAX_KEY_BYTES}"
            )
        if _KEY_RE.fullmatch(raw) is None:
            raise InvalidPrimaryKey(
                f"primary key {value[:64]!r} has characters outside [A-Za-z0-9_-]"
            )
        return raw
    if value is None:
        raise InvalidPrimaryKey("primary key is null")
    if isinstance(value, float):
        raise InvalidPrimaryKey(f"primary key is a float ({value!r}); expected an integer or a string")
    kind = "an object" if isinstance(value, dict) else "an array" if isinstance(value, list) else type(value).__name__
    raise InvalidPrimaryKey(f"primary key is {kind}; expected an integer or a string")


class _NegativeZero:
    """What ``-0`` decodes to while looking for it (``int("-0")`` is plain 0)."""


_NEGATIVE_ZERO = _NegativeZero()


def _int_or_negative_zero(text: str) -> int | _NegativeZero:
    return _NEGATIVE_ZERO if text == "-0" else int(text)


def negative_zero_key(line: bytes, primary_key: str) -> bool:
    """True when the primary key of ``line`` (a JSON object) is written ``-0``: JSON decoders
    read it as the integer 0, but Meilisearch reads it as the float ``-0.0`` and refuses it, so
    it must never be routed as document 0 (which it would silently replace)."""
    if b"-0" not in line:
        return False
    try:
        doc = json.loads(line, parse_int=_int_or_negative_zero)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get(primary_key) is _NEGATIVE_ZERO


class Router:
    """Precomputed shard → write-target table for one topology (hot-path helper)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.shards = topology.shards
        self.node_ids: list[str] = [n.id for n in topology.all_nodes()]
        index_of = {node: i for i, node in enumerate(self.node_ids)}
        self.targets: list[tuple[int, ...]] = [
            tuple(index_of[n] for n in write_targets(s, topology)) for s in range(self.shards)
        ]

    def shard(self, pk_utf8: bytes) -> int:
        return _xxh64(pk_utf8 + _STR_TERMINATOR) % self.shards

    def shard_many(self, keys: list[str]) -> list[int]:
        """:meth:`shard` of many keys given as text, in one call (the hot path's batch form).

        Same formula, applied with C-level passes: ASCII keys without a newline (what document
        ids are) are terminated and encoded as one buffer that is split back into keys.
        """
        terminated: Iterable[bytes]
        plain = "".join(keys)
        if keys and plain.isascii() and "\n" not in plain:
            terminated = ("\xff\n".join(keys) + "\xff").encode("latin-1").split(b"\n")
        else:
            terminated = map(bytes.__add__, map(str.encode, keys), repeat(_STR_TERMINATOR))
        return list(map(mod, map(_xxh64, terminated), repeat(self.shards)))

    def targets_of(self, shard_id: int) -> list[str]:
        return [self.node_ids[i] for i in self.targets[shard_id]]
