"""The shard tag spliced at the front of a stored document: retagged and removed without
decoding only when it is the integer the pipeline writes, so nothing else is cut apart."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from miroir_pipeline.fleet.routing import SHARD_FIELD
from miroir_pipeline.fleet.shard_tag import TAG_START, retag, untag

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _with_tag_first(tag: Any, rest: dict[str, Any]) -> bytes:
    return orjson.dumps({SHARD_FIELD: tag, **{k: v for k, v in rest.items() if k != SHARD_FIELD}})


@given(tag=_json, rest=st.dictionaries(st.text(max_size=6), _json, max_size=4), shard=st.integers(0, 4095))
def test_retag_sets_the_shard_whatever_the_old_tag_holds(tag: Any, rest: dict[str, Any], shard: int) -> None:
    raw = _with_tag_first(tag, rest)
    assert raw.startswith(TAG_START)
    doc = orjson.loads(retag(raw, shard))
    want = {k: v for k, v in rest.items() if k != SHARD_FIELD}
    assert doc == {SHARD_FIELD: shard, **want}


def test_non_integer_tags_with_commas_are_decoded_not_cut() -> None:
    for raw in (
        b'{"_miroir_shard":[1,2],"id":"a"}',
        b'{"_miroir_shard":"1,2","id":"a"}',
        b'{"_miroir_shard":{"a":1,"b":2},"id":"a"}',
        b'{"_miroir_shard":-1,"id":"a"}',
    ):
        assert orjson.loads(retag(raw, 7)) == {SHARD_FIELD: 7, "id": "a"}, raw
        assert untag(raw) == raw, "only the pipeline's own integer tag is taken off"
    assert untag(b'{"_miroir_shard":12,"id":"a"}') == b'{"id":"a"}'
