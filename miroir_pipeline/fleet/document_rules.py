"""What every target refuses in a document, checked without decoding it in full.

Meilisearch 1.21 refuses, for the whole task, a document that

* nests deeper than 128 objects/arrays, the document itself included (``recursion limit
  exceeded``, reported as an ``internal`` error);
* holds its primary-key field more than once at the top level, spelled plainly or with
  escapes (``invalid_document_id``);
* has a top-level ``_vectors`` that is not an object (``invalid type … expected a map``).

The dump import checks these in its hot path: one C-speed pass over a whole block tells
whether any line could break a rule (nearly always none can), and only then are its lines
checked one by one, each with cheap pre-filters before any decoding. The local node store
applies the same rules on write, so the embedded default never accepts what production
would refuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from itertools import repeat
from operator import contains
from typing import Any

import msgspec

__all__ = [
    "MAX_DEPTH",
    "block_may_break_rules",
    "block_may_nest_too_deep",
    "depth_exceeds",
    "document_problem",
    "duplicate_key",
    "vectors_problem",
]

#: Deepest nesting of objects/arrays Meilisearch accepts, the document object included.
MAX_DEPTH = 128
_VECTORS = b'"_vectors"'
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
#: A key (a string followed by ``:``) that holds an escape: it may spell the primary key.
_ESCAPED_KEY = re.compile(rb'"(?:[^"\\]|\\.)*\\u(?:[^"\\]|\\.)*"\s*:')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_NOT_BRACKETS_OR_NEWLINE = bytes(c for c in range(256) if c not in b"[]{}\n")
#: A line needs this many bracket characters to nest more than MAX_DEPTH deep (searched for in
#: brackets and newlines only, each line preceded by its newline: the search then tries a match
#: once per line, not at every bracket).
_TOO_MANY_BRACKETS = re.compile(rb"\n[^\n]{%d}" % (2 * MAX_DEPTH + 2))
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])


def block_may_break_rules(block: bytes, lines: Sequence[bytes], quoted_pk: bytes) -> bool:
    """False when no line of ``block`` (split into ``lines``) can break a rule: every non-empty
    line holds the primary key's name exactly once, nothing is escaped, no ``_vectors``, and no
    line has enough brackets to nest too deep.

    "Exactly once" takes both the block's count and each line holding the name: with the count
    alone, a line holding it twice (a duplicated key) hides behind a line without it (one the
    decoder refuses) or behind blank lines counted as lines."""
    nonempty = len(lines) - lines.count(b"")
    if (b"\\" in block and b"\\u" in block) or _VECTORS in block or block.count(quoted_pk) != nonempty:
        return True
    if not all(map(contains, filter(None, lines), repeat(quoted_pk))):
        return True
    return block_may_nest_too_deep(block)


def block_may_nest_too_deep(block: bytes) -> bool:
    """False when no line of ``block`` holds enough brackets to nest deeper than allowed."""
    brackets = b"\n" + block.translate(None, _NOT_BRACKETS_OR_NEWLINE)
    return _TOO_MANY_BRACKETS.search(brackets) is not None


def depth_exceeds(line: bytes) -> bool:
    """True when ``line`` nests more than :data:`MAX_DEPTH` containers deep."""
    if len(line) <= 2 * MAX_DEPTH + 1 or line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    depth = deepest = 0
    for c in _STRING.sub(b'""', line).translate(None, _NOT_BRACKETS):
        if c in (91, 123):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


def duplicate_key(line: bytes, key: str, quoted: bytes | None = None) -> bool:
    """True when the top-level object of ``line`` holds ``key`` more than once (plainly or spelled
    with escapes). ``quoted`` is ``b'"key"'``, precomputed by hot loops.

    Nested objects may hold the same name freely: the plain count is corrected by what the
    top-level values hold (one decode into raw values, only when the name appears twice)."""
    quoted = quoted or json.dumps(key).encode()
    times = line.count(quoted)
    if times > 1:
        try:
            values = _TOP_LEVEL.decode(line)
        except (msgspec.DecodeError, RecursionError):
            return False  # not a valid object: reported as such elsewhere
        nested = sum(bytes(v).count(quoted) for v in values.values())
        if times - nested > 1:
            return _exactly_duplicated(line, key)
    if b"\\u" in line and _ESCAPED_KEY.search(line):
        return _exactly_duplicated(line, key)
    return False


def vectors_problem(line: bytes) -> str | None:
    """Why a top-level ``_vectors`` is refused (it must be an object), or None."""
    if _VECTORS not in line:
        return None
    try:
        values = _TOP_LEVEL.decode(line)
    except (msgspec.DecodeError, RecursionError):
        return None
    raw = values.get("_vectors")
    if raw is None or bytes(raw).lstrip().startswith(b"{"):
        return None
    return "_vectors must be an object (embedder name to vectors), which Meilisearch requires"


def document_problem(line: bytes, primary_key: str, quoted_pk: bytes | None = None) -> str | None:
    """Why a target would refuse ``line`` (a JSON object that decodes), or None."""
    if depth_exceeds(line):
        return f"document nests deeper than {MAX_DEPTH} levels of objects/arrays, which Meilisearch refuses"
    if duplicate_key(line, primary_key, quoted_pk):
        return f"primary key field {primary_key!r} appears more than once, which Meilisearch refuses"
    return vectors_problem(line)


class _Counted(dict[str, Any]):
    count = 0


class _CountKey:
    """``object_pairs_hook`` counting ``key`` among each object's members; the outermost object
    is built last, so its count is the one left on the result."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, pairs: list[tuple[str, Any]]) -> _Counted:
        obj = _Counted(pairs)
        obj.count = sum(1 for k, _ in pairs if k == self.key)
        return obj


def _exactly_duplicated(line: bytes, key: str) -> bool:
    try:
        decoded = json.loads(line, object_pairs_hook=_CountKey(key))
    except (ValueError, RecursionError):
        return False
    return isinstance(decoded, _Counted) and decoded.count > 1
