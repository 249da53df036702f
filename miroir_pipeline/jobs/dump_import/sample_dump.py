"""Synthetic, realistic NDJSON dumps for demos and benchmarks (string and integer ids, nested
fields, unicode), deterministic for a seed."""

from __future__ import annotations

import random
from pathlib import Path

import orjson

__all__ = ["write_sample_dump"]

_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma", "omega", "river", "mountain", "forest", "ocean", "desert", "city", "village", "bridge", "tower", "garden", "library", "market", "harbor", "station", "café", "naïve", "Zürich", "München", "São", "Paulo", "東京", "北京", "Москва", "Αθήνα", "서울", "القاهرة"]


def write_sample_dump(path: str | Path, size_bytes: int, *, seed: int = 0, doc_bytes: int = 1024) -> tuple[int, int]:
    """Write about ``size_bytes`` of ~``doc_bytes`` documents; return (documents, bytes written)."""
    rng = random.Random(seed)
    pool = " ".join(rng.choices(_WORDS, k=200_000))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = 0
    written = 0
    with out.open("wb", buffering=8 << 20) as fh:
        while written < size_bytes:
            doc = _document(rng, pool, docs, doc_bytes)
            line = orjson.dumps(doc) + b"\n"
            fh.write(line)
            written += len(line)
            docs += 1
    return docs, written


def _document(rng: random.Random, pool: str, n: int, doc_bytes: int) -> dict[str, object]:
    doc_id: int | str = n if n % 2 else f"doc-{n:09d}"
    words = rng.choices(_WORDS, k=12)
    doc: dict[str, object] = {
        "id": doc_id,
        "title": " ".join(words[:6]).title(),
        "price": round(rng.uniform(1, 1000), 2),
        "in_stock": rng.random() < 0.7,
        "tags": words[6:10],
        "author": {"name": rng.choice(_WORDS).title(), "country": rng.choice(_WORDS), "rank": rng.randint(1, 500)},
        "ratings": [rng.randint(1, 5) for _ in range(5)],
    }
    filler = max(0, doc_bytes - 330)
    start = rng.randrange(0, len(pool) - filler - 1)
    doc["body"] = pool[start : start + filler]
    return doc
