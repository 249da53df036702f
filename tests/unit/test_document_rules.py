"""What every target refuses in a document: the cheap checks agree with a full decode, and the
block-level pre-filter never clears a block holding a line that breaks a rule."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from miroir_pipeline.fleet.document_rules import (
    MAX_DEPTH,
    block_may_break_rules,
    depth_exceeds,
    document_problem,
    duplicate_key,
)


def doc_with_depth(depth: int) -> bytes:
    """A document whose deepest container is ``depth`` levels, the document object included."""
    return ('{"id":"a","x":' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}").encode()


def true_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((true_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((true_depth(v) for v in value), default=0)
    return 0


def test_depth_limit_matches_meilisearch() -> None:
    # Measured on Meilisearch 1.21: 128 levels are accepted, 129 refused.
    assert not depth_exceeds(doc_with_depth(MAX_DEPTH))
    assert depth_exceeds(doc_with_depth(MAX_DEPTH + 1))
    assert depth_exceeds(doc_with_depth(301))
    assert depth_exceeds(doc_with_depth(100_000))
    # Brackets inside strings do not nest.
    assert not depth_exceeds(('{"id":"a","x":"' + "[" * 1000 + '"}').encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="ab[]{}\"\\", max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["id", "a", "b"]), children, max_size=3),
    max_leaves=40,
)


@given(st.integers(1, 200), json_values)
@settings(max_examples=200)
def test_depth_check_agrees_with_a_full_decode(extra: int, value: Any) -> None:
    deep: Any = value
    for _ in range(extra):
        deep = [deep]
    line = json.dumps({"id": "k", "v": deep}).encode()
    assert depth_exceeds(line) == (true_depth(json.loads(line)) > MAX_DEPTH)


def test_duplicate_primary_key_fields() -> None:
    assert duplicate_key(b'{"id":"d1","id":"d2","t":"dup"}', "id")
    assert duplicate_key(b'{"\\u0069d":"e1","id":"e2"}', "id")  # escaped spelling
    assert duplicate_key(b'{"id":1,"id":{"id":2}}', "id")
    assert not duplicate_key(b'{"id":"d1","author":{"id":"x"},"tags":[{"id":1}]}', "id")
    assert not duplicate_key(b'{"id":"d1","t":"\\"id\\" in a value"}', "id")
    assert not duplicate_key(b'{"id":"d1","t":"\\u00e9t\\u00e9"}', "id")
    # A duplicated other field that hides the name in its dropped value is not a duplicate id.
    assert not duplicate_key(b'{"id":1,"x":{"id":2},"x":3}', "id")


def test_vectors_must_be_an_object() -> None:
    assert document_problem(b'{"id":"v","_vectors":{"e":[1,2]}}', "id") is None
    assert document_problem(b'{"id":"v","_vectors":{}}', "id") is None
    for bad in (b"null", b"[1,2]", b"5", b'"x"'):
        assert "_vectors" in str(document_problem(b'{"id":"v","_vectors":' + bad + b"}", "id"))
    assert document_problem(b'{"id":"v","nested":{"_vectors":5}}', "id") is None


def test_block_prefilter_clears_plain_blocks_and_flags_every_rule() -> None:
    plain = b'{"id":1,"a":[1,2]}\n{"id":2,"b":{"c":3}}\n'
    assert not block_may_break_rules(plain, plain.split(b"\n"), b'"id"')
    for bad in (
        b'{"id":3,"id":4}',
        b'{"\\u0069d":3}',
        b'{"id":3,"_vectors":5}',
        doc_with_depth(MAX_DEPTH + 1),
    ):
        block = plain + bad + b"\n"
        assert block_may_break_rules(block, block.split(b"\n"), b'"id"'), bad


def test_block_prefilter_is_not_fooled_by_lines_that_even_out_the_count() -> None:
    """A duplicated key is flagged even when the block holds the name as many times as it has
    lines: blank lines, or a line without the key, make up for it (found by the property test
    of routed lines)."""
    dup = b'{"id":"dup","id":"dup2"}'
    for block in (
        b'{"id":"0","n":{"id":1}}\n{"id":"0","n":{"id":1}}\n\n\n\n' + dup + b"\n",
        dup + b'\n{"name":"no key"}\n',
    ):
        assert block_may_break_rules(block, block.split(b"\n"), b'"id"'), block
