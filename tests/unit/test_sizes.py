"""Sizes accept plain bytes and IEC/SI units, case-insensitively (``import --chunk-size``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miroir_pipeline.util.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB", 64 * 1024),
        ("256MiB", 256 * 1024**2),
        ("1GiB", 1024**3),
        ("1048576", 1048576),
        ("0", 0),
        ("10MB", 10_000_000),
        ("1.5GiB", 1536 * 1024**2),
        ("2TiB", 2 * 1024**4),
        ("1tb", 1000**4),
        ("64kib", 65536),
        ("64KIB", 65536),
        ("64kB", 64_000),
        ("64K", 64_000),
        ("64Ki", 65536),
        ("256Mi", 256 * 1024**2),
        ("100 MB", 100_000_000),
        (" 7B ", 7),
        ("0.5KiB", 512),
        ("1.1KiB", 1126),  # 1126.4 rounded down to a whole byte
        (".5MiB", 512 * 1024),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "invalid size ''"),
        ("abc", "invalid size 'abc'"),
        ("-1MiB", "invalid size '-1MiB'"),
        ("10XB", "unknown unit 'XB'"),
        ("10 parsecs", "unknown unit"),
        ("1.5", "whole number"),
        ("1.5B", "whole number"),
        ("1,000", "invalid size '1,000'"),
        ("1e6", "invalid size '1e6'"),
        ("MiB", "invalid size 'MiB'"),
    ],
)
def test_parse_size_rejects_with_the_text(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        parse_size(text)


def test_parse_size_rejects_negative_int_and_bool() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)
    with pytest.raises(ValueError, match="boolean"):
        parse_size(True)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (65536, "64KiB"),
        (256 * 1024**2, "256MiB"),
        (1024**3, "1GiB"),
        (1536 * 1024**2, "1.5GiB"),
        (10_000_000, "9.54MiB"),
        (1025, "1.00KiB"),
        (3 * 1024**5, "3PiB"),
        (-2048, "-2KiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=1023), st.sampled_from([1, 1024, 1024**2, 1024**3]))
def test_exact_multiples_round_trip(k: int, unit: int) -> None:
    n = k * unit
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=2**62))
def test_format_is_close_and_parseable(n: int) -> None:
    back = parse_size(format_size(n))
    assert abs(back - n) <= max(1, n * 0.005)
