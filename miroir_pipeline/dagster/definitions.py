"""The Definitions object: what Dagster loads (``definitions.py`` at the repo root re-exports it)."""


import dagster as dg

from miroir_pipeline.dagster.dump_import_assets import (
    dump_chunk,
    dump_chunk_job,
    plan_dump_import_job,
)
from miroir_pipeline.dagster.reshard_assets import (
    RESHARD_ASSET_CHECKS,
    RESHARD_ASSETS,
    RESHARD_JOBS,
)
from miroir_pipeline.dagster.resources import (
    JobStoreResource,
    SettingsResource,
    TopologyResource,
)
from miroir_pipeline.dagster.sensors import chunk_dispatch_sensor, queue_depth_sensor


def build_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=[dump_chunk, *RESHARD_ASSETS],
        asset_checks=RESHARD_ASSET_CHECKS,
        jobs=[dump_chunk_job, plan_dump_import_job, *RESHARD_JOBS],
        sensors=[chunk_dispatch_sensor, queue_depth_sensor],
        resources={
            "jobs": JobStoreResource(),
            "topology": TopologyResource(),
            "settings": SettingsResource(),
        },
    )


defs = build_definitions()
