"""Dump sources: where import workers get their documents from.

A dump URI (local path, ``file://``, ``s3://``, ``gs://``, ``hdfs://``) is opened through
:mod:`pyarrow.fs` after an allowed-roots check (:mod:`.resolve`), and read one chunk at a
time by byte range (:mod:`.ranges`). Gzip'd NDJSON and Meilisearch ``.dump`` archives cannot
be read by range, so they are staged first as plain NDJSON (:mod:`.staging`,
:mod:`.meili_dump`); :mod:`.split` cuts a dump into line-aligned ranges.
"""

from miroir_pipeline.sources.ranges import (
    BLOCK_SIZE,
    LineBlock,
    iter_line_blocks,
    open_range,
)
from miroir_pipeline.sources.resolve import (
    DumpRef,
    DumpSourceError,
    resolve_dump,
    resolve_planned_dump,
)
from miroir_pipeline.sources.staging import DumpKind, StagedDump, stage_dump

__all__ = [
    "BLOCK_SIZE",
    "DumpKind",
    "DumpRef",
    "DumpSourceError",
    "LineBlock",
    "StagedDump",
    "iter_line_blocks",
    "open_range",
    "resolve_dump",
    "resolve_planned_dump",
    "stage_dump",
]
