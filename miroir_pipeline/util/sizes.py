"""Byte sizes as operators write them: ``1048576``, ``64KiB``, ``256MiB``, ``1.5GiB``, ``10MB``.

IEC units (``KiB``, ``MiB``, … and Kubernetes-style ``Ki``, ``Mi``, …) are powers of 1024;
SI units (``kB``, ``MB``, … and bare ``K``, ``M``, … as in Kubernetes quantities) are powers
of 1000. Units are case-insensitive. Used by the CLI's ``--chunk-size`` and by config.
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal

__all__ = ["format_size", "parse_size"]

_PREFIXES = "kmgtpe"
_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _p in enumerate(_PREFIXES, start=1):
    _UNITS[_p] = _UNITS[_p + "b"] = 1000**_power
    _UNITS[_p + "i"] = _UNITS[_p + "ib"] = 1024**_power

_SIZE_RE = re.compile(r"\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*")
_IEC_NAMES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"256MiB"`` into a number of bytes.

    Fractions are allowed with a unit (``1.5GiB``) and rounded down to a whole byte; a plain
    byte count must be a whole number. Raises ``ValueError`` naming the text otherwise.
    """
    if isinstance(text, bool):
        raise ValueError(f"size {text!r} is a boolean; write a byte count such as 256MiB")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative; sizes are byte counts >= 0")
        return text
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: write a byte count such as 1048576, or a number with a unit "
            "(B, KiB, MiB, GiB, TiB or kB, MB, GB, TB), e.g. 256MiB"
        )
    unit = match["unit"].lower()
    factor = _UNITS.get(unit)
    if factor is None:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {match['unit']!r}; "
            "use B, KiB, MiB, GiB, TiB (powers of 1024) or kB, MB, GB, TB (powers of 1000)"
        )
    number = Decimal(match["num"])
    value = number * factor
    if factor == 1 and value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: a byte count must be a whole number")
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def format_size(n: int) -> str:
    """Render a byte count with the largest IEC unit, e.g. ``268435456`` → ``"256MiB"``.

    Exact multiples print as integers (and parse back to the same value); other values get
    up to two decimals (``1.46GiB``), which is for reading, not for round-tripping.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"format_size expects an int byte count, got {type(n).__name__}")
    if n < 0:
        return "-" + format_size(-n)
    power = 0
    while power + 1 < len(_IEC_NAMES) and n >= 1024 ** (power + 1):
        power += 1
    factor = 1024**power
    if n % factor == 0:
        return f"{n // factor}{_IEC_NAMES[power]}"
    text = f"{n / factor:.2f}"
    stripped = text.rstrip("0").rstrip(".")
    # Keep "1.00KiB" for 1025 bytes: a bare integer would claim an exactness it lacks.
    return f"{stripped if '.' in stripped else text}{_IEC_NAMES[power]}"
