"""The import hot path: NDJSON lines → primary key → shard → ``_miroir_shard`` injected →
per-node buffers.

Only the primary key (and a stray ``_miroir_shard``) is decoded; every other field is checked
by msgspec's JSON scanner but never becomes a Python object, and the document bytes are
forwarded as they are, with the shard spliced in after the opening brace. Block-level checks
(UTF-8 via Arrow's validator, CR, over-long lines) come first. An ordinary block — every line
one plain document — is then routed as a whole with C-level passes and no per-document Python
loop: one msgspec ``decode_lines`` call for all primary keys, one match over all key texts,
hashes and tags over lists (``_route_block``). Anything unusual in a block sends it to the
per-line loop and, line by line, to the careful path. What every target would refuse (nesting
too deep, a duplicated primary-key field, a ``_vectors`` that is not an object) is caught here,
so such a line fails alone and names its line instead of failing a node's batch.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import dataclass
from itertools import compress, repeat
from operator import itemgetter
from typing import Annotated, Any, NamedTuple

import msgspec
import orjson
import pyarrow as pa

from miroir_pipeline.fleet.document_rules import (
    block_may_break_rules,
    block_may_nest_too_deep,
    depth_exceeds,
    document_problem,
)
from miroir_pipeline.fleet.routing import (
    I64_MIN,
    SHARD_FIELD,
    U64_MAX,
    InvalidPrimaryKey,
    Router,
    negative_zero_key,
    primary_key_text,
)
from miroir_pipeline.fleet.shard_tag import shard_prefixes, tag

__all__ = ["BLANKS", "BOM", "BlockResult", "DocumentRouter", "InvalidLine", "RoutedBatch"]

#: What the router strips around a document: a BOM (opening the file only) and blanks.
BOM = b"\xef\xbb\xbf"
BLANKS = b" \t\r"
# Meilisearch's document id rules, checked inside msgspec's decoder (C) on the fast path;
# the reason for a rejection is worded by routing.primary_key_text on the slow path.
# (msgspec cannot bound an integer beyond int64: the 64-bit range is checked after decoding.)
_PrimaryKey = int | Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]+$", max_length=511)]
# The whole-block path checks all of a block's keys at once: their types, then their text (an
# integer's decimal text is within the same characters) with one match over all of them, each
# followed by a newline (and no newline in any of them).
_KEY_TYPES = {int, str}
_KEY_TEXTS = re.compile(r"(?:[A-Za-z0-9_-]{1,511}\n)*")
_IS_INT = int.__instancecheck__
_FIRST_BYTE = itemgetter(0)
_LAST_BYTE = itemgetter(-1)


class _AnObject(msgspec.Struct, gc=False):
    """Any JSON object (its members are scanned and dropped): what ``_vectors`` must be."""


class _Seen:
    """What the whole-block decoder stores for a primary key: its value went to a list."""


_SEEN = _Seen()


@dataclass(frozen=True)
class InvalidLine:
    """A line that cannot be imported: where it is (relative to its block) and why."""

    line_in_block: int  # 0-based index of the line within the block
    offset_in_block: int
    reason: str
    raw: bytes


class RoutedBatch(NamedTuple):
    """Documents bound for one node: the lines to send, with each one's primary key and shard."""

    lines: list[bytes]
    keys: list[str | int]
    shards: list[int]


@dataclass
class BlockResult:
    documents: int = 0
    blank_lines: int = 0
    lines: int = 0


class DocumentRouter:
    """Routes blocks of complete NDJSON lines into one buffer per node of the topology."""

    def __init__(
        self, router: Router, primary_key: str, max_document_bytes: int, limit_name: str = "max_document_bytes"
    ) -> None:
        self.router = router
        self.primary_key = primary_key
        self.max_document_bytes = max_document_bytes
        #: Where the document limit comes from, for the reason a longer line is refused.
        self.limit_name = limit_name
        strict: Any = msgspec.defstruct(
            "PrimaryKeyOnly",
            [("pk", _PrimaryKey), ("shard", Any, msgspec.UNSET)],
            rename={"pk": primary_key, "shard": SHARD_FIELD},
        )
        self._decode = msgspec.json.Decoder(strict).decode
        # The whole-block decoder hands every top-level primary-key value (escaped spellings
        # included) to a list, in order: one per document means no document holds the field
        # twice. It refuses what the per-line path treats specially, so that such a block takes
        # that path: a carried ``_miroir_shard`` (UnsetType never decodes) and a ``_vectors``
        # that is not an object (which the per-line path explains).
        self._block_keys: list[Any] = []
        self._decode_lines: Any = None
        if primary_key not in (SHARD_FIELD, "_vectors"):
            plain: Any = msgspec.defstruct(
                "PlainDocument",
                [
                    ("pk", _Seen),
                    ("shard", msgspec.UnsetType, msgspec.UNSET),
                    ("vectors", _AnObject, msgspec.UNSET),
                ],
                rename={"pk": primary_key, "shard": SHARD_FIELD, "vectors": "_vectors"},
                gc=False,
            )
            self._decode_lines = msgspec.json.Decoder(
                plain, dec_hook=_collector(self._block_keys)
            ).decode_lines
        #: Per node, which shards it receives (a byte per shard, padded to a 256-byte
        #: translation table when the shard ids fit in a byte) and whether that is every shard,
        #: for the whole-block path.
        self._node_shards: list[tuple[bytes, bool]] = []
        for node in range(len(router.node_ids)):
            wanted = bytes(node in t for t in router.targets)
            table = wanted.ljust(256, b"\0") if router.shards <= 256 else wanted
            self._node_shards.append((table, 0 not in wanted))
        self._prefixes = shard_prefixes(router.shards)
        self._quoted_pk = orjson.dumps(primary_key)
        self._check_rules = True
        self._targets = router.targets
        self._replicas = len(router.targets[0]) if router.targets else 1
        self.buffers: list[list[bytes]] = [[] for _ in router.node_ids]
        #: Per node, the primary key value and shard of each buffered line (same order).
        self.keys: list[list[str | int]] = [[] for _ in router.node_ids]
        self.shards: list[list[int]] = [[] for _ in router.node_ids]
        self._flushed_per_node = [0] * len(router.node_ids)
        self.buffered_bytes = 0
        self.buffered_docs = 0
        self._at_file_start = False
        self._blank = 0
        self._lines_ctx: list[bytes] = []

    # -- buffers ----------------------------------------------------------------------------
    @property
    def per_node_docs(self) -> list[int]:
        """Documents routed to each node so far (flushed and buffered)."""
        return [f + len(b) for f, b in zip(self._flushed_per_node, self.buffers, strict=True)]

    def set_per_node_docs(self, counts: list[int]) -> None:
        """Start counting from committed progress (a resumed chunk)."""
        self._flushed_per_node = list(counts)

    def take_buffers(self) -> list[RoutedBatch]:
        """Hand over what is buffered (one batch per node, in node order) and start afresh."""
        out = [RoutedBatch(*b) for b in zip(self.buffers, self.keys, self.shards, strict=True)]
        self._flushed_per_node = self.per_node_docs
        n = len(self.buffers)
        self.buffers = [[] for _ in range(n)]
        self.keys = [[] for _ in range(n)]
        self.shards = [[] for _ in range(n)]
        self.buffered_bytes = 0
        self.buffered_docs = 0
        return out

    # -- routing ----------------------------------------------------------------------------
    def route_block(
        self, block: bytes, *, at_file_start: bool, invalid: list[InvalidLine], end: int | None = None
    ) -> BlockResult:
        """Route every line of ``block[:end]`` (complete lines; the last may lack its newline).

        ``end`` (default: all of it) lets a line-aligned read be routed in place: ``block[end:]``
        is the start of the next read, and an ordinary block is never copied. Invalid lines are
        appended to ``invalid`` (in order) and not routed; the caller decides whether that stops
        the chunk.
        """
        lines = block.split(b"\n")
        if end is None or end >= len(block):
            end = len(block)
            if lines and not lines[-1]:
                lines.pop()
        elif end <= 0:
            end, lines = 0, []
        else:
            lines.pop()  # block[end:]: the next read's first line (block[end - 1] is a newline)
        result = BlockResult(lines=len(lines))
        self._at_file_start = at_file_start
        self._blank = 0
        valid = self._valid(block, lines, end)
        docs = self._route_block(block, lines, end) if valid else -1
        if docs < 0:
            if end < len(block):
                block = block[:end]  # only the unusual blocks pay for a copy
            plain = valid and b"\r" not in block
            self._check_rules = block_may_break_rules(block, lines, self._quoted_pk)
            if plain:
                docs = self._route_fast(lines, invalid)
            else:
                docs = sum(self._route_careful(lines, i, invalid) for i in range(len(lines)))
        result.documents = docs
        result.blank_lines = self._blank
        self.buffered_docs += docs
        self.buffered_bytes += end * self._replicas
        return result

    def _valid(self, block: bytes, lines: list[bytes], end: int) -> bool:
        """True when ``block[:end]`` is not empty, has no over-long line and is valid UTF-8 —
        checked with C-speed passes over the whole block. Such a block, unless the whole-block
        path takes it, goes to the per-line loop when it holds no CR, else to the careful path."""
        if not end:
            return False
        if end > self.max_document_bytes and max(map(len, lines)) > self.max_document_bytes:
            return False
        return _utf8_valid(block, end)

    def _route_block(self, block: bytes, lines: list[bytes], end: int) -> int:
        """``block[:end]`` in a few C-level passes, when every line is one plain document.

        Returns -1, having changed nothing, when the block holds anything the per-line path must
        look at: a line that does not start with ``{`` or end with ``}``, a line the decoder
        refuses, a primary key that is not an integer or a string of 1-511 ``[A-Za-z0-9_-]``,
        a document holding its primary-key field twice, too many brackets on a line, a
        ``_miroir_shard``, or a ``_vectors`` that is not an object. The caller has checked that
        the block is valid UTF-8 with no over-long line (a CR needs no check here: one that ends
        a line fails the last-byte check, and one inside a line is JSON whitespace, which the
        careful path keeps as well).

        One document per line: a JSON value cannot continue from a line ending in ``}`` to the
        next one starting with ``{`` (no ``}`` is followed by ``{`` inside a value, and strings
        hold no raw newline), so each line starts a document; as many documents as lines means
        each line holds exactly one. What it puts in the buffers is what the per-line loop
        would: the same documents, keys, shards and tags, in the same order per node.
        """
        decode_lines = self._decode_lines
        n = len(lines)
        if decode_lines is None or not n:
            return -1
        if not all(lines) or set(map(_FIRST_BYTE, lines)) != {123}:
            return -1  # a blank line, a BOM, leading whitespace or not an object
        if set(map(_LAST_BYTE, lines)) != {125}:
            return -1
        seen = self._block_keys
        try:
            docs = decode_lines(block if end == len(block) else memoryview(block)[:end])
        except (ValueError, RecursionError):  # msgspec's errors are ValueErrors too
            seen.clear()
            return -1
        pks = seen.copy()
        seen.clear()
        types = set(map(type, pks))
        if len(docs) != n or len(pks) != n or types - _KEY_TYPES:
            return -1
        if int in types:  # integer ids must fit in 64 bits (signed or unsigned), as Meilisearch's
            ints = list(compress(pks, map(_IS_INT, pks)))
            low, high = min(ints), max(ints)
            if low < I64_MIN or high > U64_MAX:
                return -1
            if low <= 0 <= high and 0 in ints and b"-0" in block:
                return -1  # maybe a key written -0, which Meilisearch refuses: checked per line
        try:
            texts = list(map(format, pks))
        except ValueError:  # an integer too long to print; the per-line path words it
            return -1
        joined = "\n".join(texts)
        if joined.count("\n") != n - 1 or _KEY_TEXTS.fullmatch(joined + "\n") is None:
            return -1
        if block_may_nest_too_deep(block):  # block[end:] is part of a line: a wider net, still sound
            return -1
        shards = self.router.shard_many(texts)
        # shard_tag.tag for a document without a tag: the opening brace becomes the prefix
        # (every line starts with it), one copy per document.
        prefixes = map(self._prefixes.__getitem__, shards)
        out = list(map(bytes.replace, lines, repeat(b"{"), prefixes, repeat(1)))
        # Per node, one flag per document (a byte string translated from the shards when they
        # fit in bytes); nodes that get every shard take the lists whole.
        by_shard = bytes(shards) if self.router.shards <= 256 else None
        for node, (wanted, every) in enumerate(self._node_shards):
            if every:
                self.buffers[node] += out
                self.keys[node] += pks
                self.shards[node] += shards
            elif 1 in wanted:
                picks: Any
                if by_shard is None:
                    picks = list(map(wanted.__getitem__, shards))
                else:
                    picks = by_shard.translate(wanted)
                self.buffers[node] += compress(out, picks)
                self.keys[node] += compress(pks, picks)
                self.shards[node] += compress(shards, picks)
        return n

    def _route_fast(self, lines: list[bytes], invalid: list[InvalidLine], base: int = -1) -> int:
        """The per-document loop; lines that are not plain ``{...}`` go to the careful path."""
        decode = self._decode
        prefixes = self._prefixes
        targets = self._targets
        buffers = self.buffers
        keys = self.keys
        shard_of = self.shards
        shard_of_key = self.router.shard  # the one place the routing formula lives
        unset = msgspec.UNSET
        quoted_pk = self._quoted_pk
        primary_key = self.primary_key
        check_rules = base >= 0 or self._check_rules
        docs = 0
        for i, line in enumerate(lines):
            try:
                if line[0] != 123:  # not "{": blank, BOM, whitespace, or not an object
                    raise ValueError
                doc = decode(line)
            except (IndexError, ValueError, RecursionError):  # msgspec's errors are ValueErrors too
                if base < 0:
                    docs += self._route_careful(lines, i, invalid)
                else:
                    invalid.append(self._explain(self._lines_ctx, base, line))
                continue
            if check_rules and document_problem(line, primary_key, quoted_pk) is not None:
                ctx, at = (lines, i) if base < 0 else (self._lines_ctx, base)
                invalid.append(self._explain(ctx, at, line))
                continue
            pk = doc.pk
            if type(pk) is str:
                key = pk.encode()
            elif I64_MIN <= pk <= U64_MAX:
                if not pk and negative_zero_key(line, primary_key):  # refused as -0.0
                    ctx, at = (lines, i) if base < 0 else (self._lines_ctx, base)
                    invalid.append(self._explain(ctx, at, line))
                    continue
                key = b"%d" % pk
            else:  # an integer id beyond 64 bits: Meilisearch refuses it
                ctx, at = (lines, i) if base < 0 else (self._lines_ctx, base)
                invalid.append(self._explain(ctx, at, line))
                continue
            shard = shard_of_key(key)
            try:
                out = tag(line, shard, prefixes[shard], carries_tag=doc.shard is not unset)
            except ValueError:  # a carried tag is replaced by decoding the whole line, which may fail
                ctx, at = (lines, i) if base < 0 else (self._lines_ctx, base)
                invalid.append(self._explain(ctx, at, line))
                continue
            for node in targets[shard]:
                buffers[node].append(out)
                keys[node].append(pk)
                shard_of[node].append(shard)
            docs += 1
        return docs

    def _route_careful(self, lines: list[bytes], i: int, invalid: list[InvalidLine]) -> int:
        """Per-line checks for one unusual line: BOM, CR, blank, whitespace, size, UTF-8."""
        raw = lines[i]
        line = raw[len(BOM):] if i == 0 and self._at_file_start and raw.startswith(BOM) else raw
        line = line.strip(BLANKS)
        if not line:
            self._blank += 1
            return 0
        if len(line) > self.max_document_bytes:
            too_long = f"document is {len(line)} bytes, over the {self.max_document_bytes}-byte limit ({self.limit_name})"
            invalid.append(self._invalid(lines, i, too_long))
            return 0
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            invalid.append(self._invalid(lines, i, f"invalid UTF-8 at byte {exc.start} of the line"))
            return 0
        self._lines_ctx = lines
        return self._route_fast([line], invalid, base=i)

    def _explain(self, lines: list[bytes], i: int, line: bytes) -> InvalidLine:
        """Why a line is refused (already stripped of BOM/whitespace), in an operator's words."""
        if depth_exceeds(line):
            return self._invalid(lines, i, str(document_problem(line, self.primary_key)))
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if "infinity" in str(exc):
                # Valid JSON that no double holds (more than 308 digits, or an exponent that big):
                # Meilisearch refuses it as "number out of range".
                return self._invalid(
                    lines, i, "holds a number beyond the 64-bit float range (a number of more than 300 "
                    "digits, or an exponent that large), which Meilisearch refuses (an integer primary "
                    "key must fit in 64 bits)"
                )
            return self._invalid(lines, i, f"invalid JSON: {exc}")
        if not isinstance(doc, dict):
            return self._invalid(lines, i, f"not a JSON object (a JSON {type(doc).__name__})")
        if self.primary_key not in doc:
            return self._invalid(lines, i, f"primary key {self.primary_key!r} is missing")
        pk = doc[self.primary_key]
        if type(pk) is float:  # orjson reads an integer beyond 64 bits as a float; json, exactly
            with contextlib.suppress(ValueError):
                pk = json.loads(line)[self.primary_key]
        try:
            primary_key_text(pk)
        except InvalidPrimaryKey as exc:
            return self._invalid(lines, i, str(exc))
        if pk == 0 and negative_zero_key(line, self.primary_key):
            return self._invalid(
                lines, i, "primary key is written -0, which Meilisearch reads as the float -0.0 and "
                "refuses (it is not document 0); write 0"
            )
        problem = document_problem(line, self.primary_key, self._quoted_pk)
        if problem is not None:
            return self._invalid(lines, i, problem)
        return self._invalid(lines, i, "document rejected by the JSON decoder")

    @staticmethod
    def _invalid(lines: list[bytes], i: int, reason: str) -> InvalidLine:
        offset = sum(len(x) for x in lines[:i]) + i
        return InvalidLine(line_in_block=i, offset_in_block=offset, reason=reason, raw=lines[i])


def _collector(values: list[Any]) -> Any:
    """The whole-block decoder's hook: each primary-key value it meets goes to ``values``."""
    append = values.append

    def seen(_type: type, value: Any) -> _Seen:
        append(value)
        return _SEEN

    return seen


def _utf8_valid(block: bytes, end: int) -> bool:
    """UTF-8 validation of ``block[:end]``: pure ASCII is valid (a fast C scan of the whole
    block); otherwise Arrow's validator checks the range without a copy or a str object."""
    if block.isascii():
        return True
    offsets = pa.py_buffer(struct.pack("<ii", 0, end))
    try:
        pa.StringArray.from_buffers(1, offsets, pa.py_buffer(block)).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True
