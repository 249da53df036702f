"""The ``_miroir_shard`` tag every routed document carries, spliced into raw JSON bytes.

Documents are tagged without decoding them: the tag is written as the object's first member
(``{"_miroir_shard":N,`` + the rest of the original object). A document that already carries a
tag (a dump made from a sharded index) is decoded and re-encoded once, with its old value
replaced: the tag is reserved for the pipeline.
"""

from __future__ import annotations

import msgspec
import orjson

from miroir_pipeline.fleet.routing import SHARD_FIELD

__all__ = ["TAG_START", "retag", "shard_prefixes", "tag", "untag"]

_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.encode

#: How every document the pipeline wrote starts: ``{"_miroir_shard":``.
TAG_START = b'{"' + SHARD_FIELD.encode() + b'":'


def shard_prefixes(shards: int) -> list[bytes]:
    """``{"_miroir_shard":N,`` for every shard, precomputed for the hot path."""
    return [b"%s%d," % (TAG_START, s) for s in range(shards)]


def tag(line: bytes, shard: int, prefix: bytes, *, carries_tag: bool) -> bytes:
    """``line`` (one JSON object, first byte ``{``) tagged with ``shard``; ``prefix`` is
    ``shard_prefixes(S)[shard]``. ``carries_tag``: the object already has a ``_miroir_shard``.

    A carried tag is dropped and the other members are spliced back as they were written (a
    re-encode would rewrite numbers, ``1e9`` as ``1000000000.0``, and could make the document
    longer than the limit it was checked against). Raises ``ValueError`` for a line that is not
    valid JSON (a number beyond the float range included), as Meilisearch would refuse it."""
    if not carries_tag:
        return prefix + line[1:]
    orjson.loads(line)  # the same checks as the untagged path's target will make
    members = _TOP_LEVEL.decode(line)
    members.pop(SHARD_FIELD, None)
    parts = [prefix[:-1]]
    parts.extend(b"," + _encode(name) + b":" + bytes(value) for name, value in members.items())
    return b"".join(parts) + b"}"


def retag(raw: bytes, shard: int) -> bytes:
    """A stored document with its tag set to ``shard``: only the prefix is rewritten when the
    pipeline wrote it (it starts with :data:`TAG_START`); anything else is decoded once."""
    comma = _tag_end(raw)
    if comma > 0:
        return b"%s%d%s" % (TAG_START, shard, raw[comma:])
    doc = orjson.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    doc[SHARD_FIELD] = shard
    return bytes(orjson.dumps(doc))


def untag(doc: bytes) -> bytes:
    """The document as it was before :func:`tag` spliced the prefix in (a document whose old tag
    was replaced, decoded and re-encoded, is returned as it is)."""
    comma = _tag_end(doc)
    if comma > 0:
        return b"{" + doc[comma + 1 :]
    return doc


def _tag_end(doc: bytes) -> int:
    """Where the integer tag :func:`tag` spliced in ends (its comma), or -1 when ``doc`` does not
    start with one: a tag that is a string, array or object may hold a comma of its own, so
    only digits are cut without decoding."""
    if not doc.startswith(TAG_START):
        return -1
    comma = doc.find(b",", len(TAG_START))
    digits = doc[len(TAG_START) : comma]
    return comma if comma > len(TAG_START) and digits.isdigit() and digits.isascii() else -1
