"""The import hot path: NDJSON lines → primary key → shard → ``_miroir_shard`` injected →
per-node buffers (DESIGN §6 step 3).

Only the primary key (and a stray ``_miroir_shard``) is decoded; every other field is
validated by the JSON scanner but never becomes a Python object, and the document bytes are
forwarded as they are, with the shard spliced in after the opening brace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
import xxhash

from miroir_pipeline.routing import SHARD_FIELD, InvalidPrimaryKey, Router, primary_key_text

__all__ = ["BlockResult", "DocumentRouter", "InvalidLine"]

_BOM = b"\xef\xbb\xbf"
_TERM = b"\xff"


@dataclass(frozen=True)
class InvalidLine:
    """A line that cannot be imported: where it is (relative to the block) and why."""

    line_in_block: int  # 0-based index of the line within the block
    offset_in_block: int
    reason: str
    raw: bytes


@dataclass
class BlockResult:
    documents: int = 0
    blank_lines: int = 0
    lines: int = 0


class DocumentRouter:
    """Routes blocks of complete NDJSON lines into one buffer per node of the topology."""

    def __init__(self, router: Router, primary_key: str, max_document_bytes: int) -> None:
        self.router = router
        self.primary_key = primary_key
        self.max_document_bytes = max_document_bytes
        doc_type: Any = msgspec.defstruct(
            "PrimaryKeyOnly",
            [("pk", Any, msgspec.UNSET), ("shard", Any, msgspec.UNSET)],
            rename={"pk": primary_key, "shard": SHARD_FIELD},
        )
        self._decode = msgspec.json.Decoder(doc_type).decode
        self._prefixes = [b'{"%s":%d,' % (SHARD_FIELD.encode(), s) for s in range(router.shards)]
        self._targets = router.targets
        n = len(router.node_ids)
        self.buffers: list[list[bytes]] = [[] for _ in range(n)]
        self.per_node_docs = [0] * n
        self.buffered_bytes = 0
        self.buffered_docs = 0

    def take_buffers(self) -> list[list[bytes]]:
        """Hand over the buffered lines (per node, in node order) and start empty ones."""
        out = self.buffers
        self.buffers = [[] for _ in out]
        self.buffered_bytes = 0
        self.buffered_docs = 0
        return out

    def route_block(
        self, block: bytes, *, at_file_start: bool, invalid: list[InvalidLine]
    ) -> BlockResult:
        """Route every line of ``block`` (complete lines; the last may lack its newline).

        Invalid lines are appended to ``invalid`` (in order) and not routed; the caller decides
        whether that stops the chunk.
        """
        lines = block.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        result = BlockResult(lines=len(lines))
        bad_utf8 = _invalid_utf8_lines(block, lines)
        decode = self._decode
        prefixes = self._prefixes
        targets = self._targets
        buffers = self.buffers
        per_node = self.per_node_docs
        shards = self.router.shards
        xxh = xxhash.xxh64_intdigest
        max_bytes = self.max_document_bytes
        docs = 0
        nbytes = 0
        for i, line in enumerate(lines):
            if bad_utf8 and i in bad_utf8:
                invalid.append(self._invalid(lines, i, f"invalid UTF-8 at byte {bad_utf8[i]} of the line"))
                continue
            if line[:1] != b"{" or line[-1:] == b"\r" or len(line) > max_bytes:
                line = self._normalise(line, i == 0 and at_file_start)
                if line is None:
                    result.blank_lines += 1
                    continue
                if len(line) > max_bytes:
                    invalid.append(self._invalid(lines, i, f"document is {len(line)} bytes, over the {max_bytes}-byte limit"))
                    continue
            try:
                doc = decode(line)
                pk = doc.pk
                if type(pk) is str:
                    key = pk.encode()
                    if not 0 < len(key) < 512 or not key.isascii() or not _valid_key(key):
                        key = primary_key_text(pk)
                else:
                    if pk is msgspec.UNSET:
                        invalid.append(self._invalid(lines, i, f"primary key {self.primary_key!r} is missing"))
                        continue
                    key = primary_key_text(pk)
            except InvalidPrimaryKey as exc:
                invalid.append(self._invalid(lines, i, str(exc)))
                continue
            except msgspec.ValidationError:
                invalid.append(self._invalid(lines, i, "not a JSON object"))
                continue
            except msgspec.DecodeError as exc:
                invalid.append(self._invalid(lines, i, f"invalid JSON: {exc}"))
                continue
            except UnicodeDecodeError:
                invalid.append(self._invalid(lines, i, "invalid UTF-8 in the primary key"))
                continue
            shard = xxh(key + _TERM) % shards
            if doc.shard is msgspec.UNSET:
                out = prefixes[shard] + line[1:]
            else:
                out = _replace_shard(line, shard)
            for node in targets[shard]:
                buffers[node].append(out)
                per_node[node] += 1
                nbytes += len(out) + 1
            docs += 1
        result.documents = docs
        self.buffered_docs += docs
        self.buffered_bytes += nbytes
        return result

    @staticmethod
    def _normalise(line: bytes, first_line: bool) -> bytes | None:
        """Slow path for unusual lines: BOM, CR, surrounding whitespace; None for blank lines."""
        if first_line and line.startswith(_BOM):
            line = line[len(_BOM):]
        line = line.strip(b" \t\r")
        return line or None

    @staticmethod
    def _invalid(lines: list[bytes], i: int, reason: str) -> InvalidLine:
        offset = sum(len(x) for x in lines[:i]) + i
        return InvalidLine(line_in_block=i, offset_in_block=offset, reason=reason, raw=lines[i])


def _invalid_utf8_lines(block: bytes, lines: list[bytes]) -> dict[int, int]:
    """Lines with invalid UTF-8 (index → byte position); one C-speed pass over valid blocks."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return {}
    bad: dict[int, int] = {}
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad[i] = exc.start
    return bad


def _valid_key(key: bytes) -> bool:
    return key.translate(None, _KEY_CHARS) == b""


_KEY_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


def _replace_shard(line: bytes, shard: int) -> bytes:
    """Rare path: the dump carries its own ``_miroir_shard``; replace it (DESIGN §2)."""
    doc = orjson.loads(line)
    doc[SHARD_FIELD] = shard
    return orjson.dumps(doc)
