"""The import hot path: what gets routed where, byte for byte, and what is refused and why."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from miroir_pipeline.fleet.document_rules import document_problem
from miroir_pipeline.fleet.routing import Router, shard_for_key, write_targets
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import.document_router import DocumentRouter, InvalidLine

TOPO = Topology.parse(
    {
        "shards": 64,
        "replication_factor": 1,
        "groups": [
            {"id": 0, "nodes": [{"id": f"a{i}", "url": f"local:///tmp/a{i}"} for i in range(3)]},
            {"id": 1, "nodes": [{"id": f"b{i}", "url": f"local:///tmp/b{i}"} for i in range(2)]},
        ],
    }
)


def route(block: bytes, *, first: bool = True, limit: int = 1 << 20) -> tuple[DocumentRouter, list[InvalidLine], int, int]:
    dr = DocumentRouter(Router(TOPO), "id", limit)
    invalid: list[InvalidLine] = []
    res = dr.route_block(block, at_file_start=first, invalid=invalid)
    return dr, invalid, res.documents, res.blank_lines


def placed(dr: DocumentRouter) -> dict[str, list[dict[str, object]]]:
    return {n: [orjson.loads(x) for x in buf] for n, buf in zip(dr.router.node_ids, dr.buffers, strict=True)}


def test_each_document_lands_on_its_write_targets_with_its_shard() -> None:
    docs = [{"id": i, "v": "x"} for i in range(200)] + [{"id": f"k-{i}", "n": {"a": [1, 2]}} for i in range(200)]
    block = b"".join(orjson.dumps(d) + b"\n" for d in docs)
    dr, invalid, n, _ = route(block)
    assert invalid == [] and n == 400
    where = placed(dr)
    for d in docs:
        shard = shard_for_key(d["id"], 64)  # type: ignore[arg-type]
        expected = set(write_targets(shard, TOPO))
        holders = {node for node, got in where.items() if {**d, "_miroir_shard": shard} in got}
        assert holders == expected
    assert sum(len(v) for v in where.values()) == 400 * 2  # one copy per replica group


def test_integer_and_string_ids_hash_alike() -> None:
    dr, _, _, _ = route(b'{"id":42}\n')
    [doc] = [d for docs in placed(dr).values() for d in docs if d["id"] == 42][:1]
    assert doc["_miroir_shard"] == shard_for_key("42", 64)


def test_existing_miroir_shard_is_replaced_not_duplicated() -> None:
    dr, invalid, n, _ = route(b'{"id":"s","_miroir_shard":999,"x":1}\n')
    assert invalid == [] and n == 1
    raw = next(x for buf in dr.buffers for x in buf)
    assert raw.count(b"_miroir_shard") == 1
    assert orjson.loads(raw) == {"id": "s", "_miroir_shard": shard_for_key("s", 64), "x": 1}


def test_a_replaced_tag_keeps_every_other_member_as_written() -> None:
    """Numbers stay as the dump wrote them (no ``1e9`` → ``1000000000.0``, no big integer made a
    float), so the document is what the dump holds and no longer than it was checked at."""
    line = b'{"id":"s", "_miroir_shard":999,"x":1e9,"big":123456789012345678901234567890,"n":{"a":[1.50]}}'
    dr, invalid, n, _ = route(line + b"\n")
    assert invalid == [] and n == 1
    raw = next(x for buf in dr.buffers for x in buf)
    shard = shard_for_key("s", 64)
    assert raw == b'{"_miroir_shard":%d,"id":"s","x":1e9,"big":123456789012345678901234567890,"n":{"a":[1.50]}}' % shard
    assert len(raw) <= len(line) + len(b'{"_miroir_shard":%d,' % shard)


def test_bom_crlf_blank_lines_and_whitespace_are_accepted() -> None:
    block = b'\xef\xbb\xbf{"id":1}\r\n\r\n   \n  {"id":"b"}  \r\n\n{"id":3}'
    dr, invalid, n, blank = route(block)
    assert invalid == [] and n == 3 and blank == 3
    ids = sorted(str(d["id"]) for docs in placed(dr).values() for d in docs)
    assert ids == ["1", "1", "3", "3", "b", "b"]


def test_bom_only_accepted_on_the_first_line_of_the_file() -> None:
    _, invalid, n, _ = route(b'\xef\xbb\xbf{"id":1}\n', first=False)
    assert n == 0 and len(invalid) == 1 and "invalid JSON" in invalid[0].reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"id":1.5}', "float"),
        (b'{"id":true}', "boolean"),
        (b'{"id":null}', "null"),
        (b'{"id":{"a":1}}', "object"),
        (b'{"id":[1]}', "array"),
        (b'{"id":""}', "empty"),
        (b'{"id":"a b"}', "characters outside"),
        (b'{"id":"\xc3\xa9"}', "characters outside"),
        (b'{"id":"' + b"a" * 512 + b'"}', "512 bytes"),
        (b'{"x":1}', "missing"),
        (b"[1,2]", "not a JSON object"),
        (b'"str"', "not a JSON object"),
        (b'{"id":1,', "invalid JSON"),
        (b'{"id":"ok","v":"\xff\xfe"}', "invalid UTF-8"),
        (b"{oops}", "invalid JSON"),
        # What every target would refuse is caught here, one line at a time:
        (b'{"id":"d1","id":"d2","t":"dup"}', "appears more than once"),
        (b'{"\\u0069d":"e1","id":"e2"}', "appears more than once"),
        (b'{"id":"n","x":' + b"[" * 300 + b"1" + b"]" * 300 + b"}", "deeper than 128"),
        (b'{"id":"n","x":' + b"[" * 100_000 + b"1" + b"]" * 100_000 + b"}", "deeper than 128"),
        (b'{"id":"v","_vectors":"x"}', "_vectors must be an object"),
        (b'{"id":18446744073709551616}', "integer 18446744073709551616 is outside the 64-bit range"),
        (b'{"id":-9223372036854775809}', "integer -9223372036854775809 is outside the 64-bit range"),
        (b'{"id":' + b"7" * 5000 + b"}", "a number of more than 300 digits"),
        (b'{"id":-1e400}', "beyond the 64-bit float range"),
        (b'{"id":-0}', "written -0"),
        (b'{"id": -0 ,"v":1}', "written -0"),
        (b'{"\\u0069d":-0}', "written -0"),
        # A carried tag makes the line be decoded whole (to replace it), where the number fails:
        (b'{"id":"t","_miroir_shard":1,"n":1e400}', "beyond the 64-bit float range"),
    ],
)
def test_invalid_lines_are_reported_with_position_and_reason(line: bytes, reason: str) -> None:
    block = b'{"id":"before"}\n' + line + b'\n{"id":"after"}\n'
    _, invalid, n, _ = route(block)
    assert n == 2, "valid neighbours are still routed"
    assert len(invalid) == 1
    bad = invalid[0]
    assert bad.line_in_block == 1
    assert bad.offset_in_block == len(b'{"id":"before"}\n')
    assert bad.raw == line
    assert reason in bad.reason


def test_64_bit_integer_ids_are_accepted_at_both_ends() -> None:
    dr, invalid, n, _ = route(b'{"id":18446744073709551615}\n{"id":-9223372036854775808}\n')
    assert invalid == [] and n == 2
    assert sorted({k for keys in dr.keys for k in keys}) == [-(2**63), 2**64 - 1]


def test_zero_is_a_key_and_negative_zero_is_refused_on_both_paths() -> None:
    """``-0`` decodes to 0 in Python, but Meilisearch refuses it (as ``-0.0``): routed as 0 it
    would silently replace document 0. A plain 0, and "-0" inside strings, are fine."""
    docs = [b'{"id":%d,"d":"2024-01-0%d"}' % (i, i % 9) for i in range(50)]
    for block in (b"\n".join(docs) + b"\n", b"\n".join([*docs, b'{"id":-0,"d":"x"}']) + b"\n"):
        dr, invalid, n, _ = route(block)
        assert n == 50
        assert sorted({k for keys in dr.keys for k in keys}) == list(range(50))
        assert [bad.line_in_block for bad in invalid] == ([50] if b"-0," in block else [])


def test_511_byte_key_is_accepted() -> None:
    _, invalid, n, _ = route(b'{"id":"' + b"a" * 511 + b'"}\n')
    assert invalid == [] and n == 1


def test_over_long_document_is_refused() -> None:
    big = b'{"id":1,"pad":"' + b"x" * 5000 + b'"}'
    _, invalid, n, _ = route(big + b"\n" + b'{"id":2}\n', limit=4096)
    assert n == 1 and "over the 4096-byte limit" in invalid[0].reason


def test_take_buffers_keeps_per_node_counts() -> None:
    dr, _, _, _ = route(b"".join(b'{"id":%d}\n' % i for i in range(50)))
    before = dr.per_node_docs
    dr.take_buffers()
    assert dr.per_node_docs == before and sum(before) == 100
    assert dr.buffered_docs == 0 and dr.buffered_bytes == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)), max_size=60))
def test_property_every_valid_document_routed_exactly_per_formula(ids: list[int | str]) -> None:
    # Integers are written by hand: orjson refuses the u64 range above i64.
    block = b"".join(
        (b'{"id":%d,"payload":"\xc3\xa9"}\n' % i) if isinstance(i, int) else orjson.dumps({"id": i, "payload": "é"}) + b"\n"
        for i in ids
    )
    dr, invalid, n, _ = route(block)
    assert invalid == [] and n == len(ids)
    counts = dict.fromkeys(dr.router.node_ids, 0)
    for i in ids:
        for node in write_targets(shard_for_key(i, 64), TOPO):
            counts[node] += 1
    assert dict(zip(dr.router.node_ids, dr.per_node_docs, strict=True)) == counts


def test_nested_fields_named_like_the_primary_key_are_fine() -> None:
    block = b'{"id":1,"author":{"id":9},"tags":[{"id":2}]}\n{"id":2,"t":"\\u00e9"}\n'
    _, invalid, n, _ = route(block)
    assert (n, invalid) == (2, [])


# Lines the whole-block path takes, and every kind of line that must send a block to the
# per-line path instead (blank, BOM, CR, whitespace, bad JSON, bad or duplicated keys, a carried
# tag, deep nesting, bad UTF-8, a stray _vectors), so that mixed blocks exercise the hand-over.
_LINE = st.one_of(
    st.integers(min_value=-(2**65), max_value=2**65).map(lambda i: b'{"id":%d,"t":"\xc3\xa9x"}' % i),
    st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True).map(lambda s: orjson.dumps({"id": s, "n": {"id": 1}})),
    st.sampled_from(
        [
            b"",
            b"  ",
            b'\xef\xbb\xbf{"id":"bom"}',
            b'{"id":"cr"}\r',
            b' {"id":"ws"} ',
            b'{"id":"dup","id":"dup2"}',
            b'{"\\u0069d":"esc"}',
            b'{"id":"tagged","_miroir_shard":3}',
            b'{"id":"v","_vectors":{"m":[1,2]}}',
            b'{"id":"v2","_vectors":[1]}',
            b'{"id":"bad key"}',
            b'{"id":1.5}',
            b'{"id":"x"',
            b"[1,2]",
            b'{"id":"utf","t":"\xff"}',
            b'{"id":"deep","x":' + b"[" * 200 + b"]" * 200 + b"}",
            b'{"t":"no key"}',
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(_LINE, min_size=1, max_size=25),
    last_newline=st.booleans(),
    tail=st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    first=st.booleans(),
)
def test_property_block_routed_in_place_matches_the_per_line_path(
    lines: list[bytes], last_newline: bool, tail: bytes, first: bool
) -> None:
    """Routing ``block[:end]`` of a longer read, whole-block path allowed, puts exactly what the
    per-line path puts for ``block`` alone: documents, keys, shards, invalid lines and counts."""
    block = b"\n".join(lines) + (b"\n" if last_newline or tail else b"")
    oracle = DocumentRouter(Router(TOPO), "id", 1 << 20)
    oracle._decode_lines = None  # the per-line path only
    want_invalid: list[InvalidLine] = []
    want = oracle.route_block(block, at_file_start=first, invalid=want_invalid)
    dr = DocumentRouter(Router(TOPO), "id", 1 << 20)
    got_invalid: list[InvalidLine] = []
    got = dr.route_block(block + tail, at_file_start=first, invalid=got_invalid, end=len(block))
    assert (got.documents, got.blank_lines, got.lines) == (want.documents, want.blank_lines, want.lines)
    assert got_invalid == want_invalid
    assert dr.buffers == oracle.buffers and dr.keys == oracle.keys and dr.shards == oracle.shards
    assert [type(k) for keys in dr.keys for k in keys] == [type(k) for keys in oracle.keys for k in keys]
    assert dr.buffered_bytes == oracle.buffered_bytes


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, min_size=1, max_size=25), first=st.booleans(), per_line=st.booleans())
@example(  # blank lines once evened out the block's count of the key's name
    lines=[b'{"id":"0","n":{"id":1}}', b'{"id":"0","n":{"id":1}}', b"", b"", b"", b'{"id":"dup","id":"dup2"}'],
    first=False,
    per_line=False,
)
def test_property_every_routed_line_passes_the_document_rules(lines: list[bytes], first: bool, per_line: bool) -> None:
    """What a dump-import batch promises its targets (``Batch.checked``): the local store skips
    its own check of the document rules because every line routed already passes them."""
    dr = DocumentRouter(Router(TOPO), "id", 1 << 20)
    if per_line:
        dr._decode_lines = None
    dr.route_block(b"\n".join(lines) + b"\n", at_file_start=first, invalid=[])
    routed = [line for buffer in dr.buffers for line in buffer]
    assert [line for line in routed if document_problem(line, "id") is not None] == []


def test_ordinary_block_takes_the_whole_block_path_in_place() -> None:
    """The in-place path really is taken for an ordinary block (not the per-line fallback)."""
    block = b"".join(b'{"id":%d,"t":"\xc3\xa9"}\n' % i for i in range(100))
    dr = DocumentRouter(Router(TOPO), "id", 1 << 20)
    dr._route_fast = None  # type: ignore[assignment,method-assign]  # any fallback would fail
    res = dr.route_block(block + b'{"id":100,"t":"', at_file_start=True, invalid=[], end=len(block))
    assert res.documents == 100 and sum(dr.per_node_docs) == 200
