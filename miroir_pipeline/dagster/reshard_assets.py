"""Reshard in Dagster: an op job that plans a reshard (prepare the shadow, split the shard-id
space, register one partition per range), the partitioned asset that backfills one range, the
``reshard_shadow`` asset with a blocking check that the shadow equals the live index, and the
``cutover`` asset that only runs on a verified shadow.

The alias flip itself stays with Miroir: ``cutover`` records that the shadow is verified and
ready (metadata and a log line) for Miroir to act on.
"""


import json
from typing import Any

import dagster as dg

from miroir_pipeline.dagster.chunk_runs import (
    NOOP_METADATA,
    lease_for_run,
    stopped_chunks_fail_clearly,
)
from miroir_pipeline.dagster.partitions import (
    RESHARD_CHUNKS,
    TAG_CHUNK_RUN,
    reshard_chunks,
)
from miroir_pipeline.dagster.resources import (
    JobStoreResource,
    SettingsResource,
    TopologyResource,
    targets_for,
)
from miroir_pipeline.fleet.topology import Topology, load_topology
from miroir_pipeline.jobs.reshard_backfill import (
    ReshardChunkParams,
    ReshardRequest,
    plan_reshard,
    process_reshard_chunk,
)
from miroir_pipeline.jobs.reshard_backfill.verification import VerificationResult, verify_shadow
from miroir_pipeline.queue.contract import JobState, JobStore

SHADOW_KEY = dg.AssetKey(["miroir", "reshard_shadow"])
CHECK_NAME = "shadow_matches_live"
SHADOW_CHECK_KEY = dg.AssetCheckKey(SHADOW_KEY, CHECK_NAME)
#: Divergent primary keys shown per kind in the check's metadata.
MAX_EXAMPLES = 20


class ReshardConfig(dg.Config):
    """A reshard request, as run config (the launchpad form in the UI)."""

    index_uid: str
    new_shards: int
    shards_per_chunk: int = 8
    new_topology_path: str | None = None
    replace_shadow: bool = False


@dg.op(description="Check the live index, prepare the shadow index, enqueue the reshard parent, split it into shard ranges, and register one partition per range.")
def plan_reshard_op(
    context: dg.OpExecutionContext,
    config: ReshardConfig,
    jobs: JobStoreResource,
    topology: TopologyResource,
    settings: SettingsResource,
) -> str:
    live = topology.get_topology()
    new = load_topology(config.new_topology_path) if config.new_topology_path else None
    request = ReshardRequest(
        index_uid=config.index_uid,
        new_shards=config.new_shards,
        shards_per_chunk=config.shards_per_chunk,
        replace_shadow=config.replace_shadow,
    )
    live_targets = targets_for(live)
    shadow_targets = targets_for(new) if new is not None else live_targets
    planned = plan_reshard(
        jobs.get_store(),
        request,
        live,
        live_targets,
        settings.get_settings(),
        new_topology=new,
        shadow_targets=shadow_targets,
    )
    context.instance.add_dynamic_partitions(RESHARD_CHUNKS, planned.chunk_ids)
    context.add_output_metadata(
        {
            "parent_job_id": planned.parent.id,
            "chunks": len(planned.chunk_ids),
            "shadow_index": planned.shadow_uid,
            "old_shards": planned.old_shards,
            "new_shards": planned.new_shards,
            "primary_key": planned.primary_key,
        }
    )
    context.log.info(
        f"reshard {planned.parent.id}: {config.index_uid} {planned.old_shards} -> "
        f"{planned.new_shards} shards into {planned.shadow_uid}, {len(planned.chunk_ids)} chunk(s) registered"
    )
    return planned.parent.id


@dg.job(description="Plan a reshard: one dynamic partition of reshard_chunk per shard range.")
def plan_reshard_job() -> None:
    plan_reshard_op()


@dg.asset(
    key=["miroir", "reshard_chunk"],
    partitions_def=reshard_chunks,
    description="One shard range of a live index re-hashed into the shadow index (resumable, fenced).",
    group_name="miroir",
)
def reshard_chunk(
    context: dg.AssetExecutionContext,
    jobs: JobStoreResource,
    settings: SettingsResource,
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    store = jobs.get_store()
    cfg = settings.get_settings()
    chunk_id = context.partition_key
    lease = lease_for_run(context, store, cfg)
    if lease is None:
        return dg.MaterializeResult(metadata=NOOP_METADATA)
    params = ReshardChunkParams.model_validate(lease.job.params)
    live_targets = targets_for(Topology.parse(params.live_topology))
    shadow_targets = targets_for(Topology.parse(params.shadow_topology))
    with stopped_chunks_fail_clearly():
        report = process_reshard_chunk(store, lease, live_targets, shadow_targets, cfg)
    context.log.info(
        f"chunk {chunk_id}: shards [{params.shard_start}, {params.shard_end}), "
        f"{report.documents} documents, {report.docs_per_s:,.0f} docs/s, "
        f"resumed from {report.resumed_from or 'the start'}"
    )
    return dg.MaterializeResult(metadata=report.as_metadata())


reshard_chunk_job = dg.define_asset_job(
    "reshard_chunk_job",
    selection=[reshard_chunk],
    executor_def=dg.in_process_executor,
    tags={TAG_CHUNK_RUN: "reshard"},
    description="Backfill one shard range of a reshard (one run per partition).",
)


class ReshardShadowConfig(dg.Config):
    """Which reshard's shadow to record: the parent job id the plan returned."""

    parent_job_id: str


def _reshard_params(store: JobStore, parent_id: str) -> ReshardChunkParams:
    """The shared part of a reshard's chunk params (uids, primary key, both topologies)."""
    children = store.children(parent_id)
    if not children:
        raise dg.Failure(description=f"reshard {parent_id} has no chunks; was it planned?")
    return ReshardChunkParams.model_validate(children[0].params)


@dg.asset(
    key=SHADOW_KEY,
    description="The shadow index of a completed reshard backfill, recorded for verification and cutover.",
    group_name="miroir",
)
def reshard_shadow(
    context: dg.AssetExecutionContext, config: ReshardShadowConfig, jobs: JobStoreResource
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    store = jobs.get_store()
    summary = store.parent_summary(config.parent_job_id)
    if summary.parent.state != JobState.COMPLETED:
        raise dg.Failure(
            description=(
                f"reshard {config.parent_job_id} is {summary.parent.state} "
                f"({summary.chunks_done}/{summary.chunks_total} chunks completed); run workers "
                "until every chunk completes before recording the shadow"
            ),
            allow_retries=False,
        )
    params = _reshard_params(store, config.parent_job_id)
    prog = summary.progress
    context.log.info(f"reshard {config.parent_job_id}: shadow {params.shadow_uid} backfilled")
    return dg.MaterializeResult(
        metadata={
            "parent_job_id": config.parent_job_id,
            "index_uid": params.index_uid,
            "shadow_index": params.shadow_uid,
            "old_shards": params.old_shards,
            "new_shards": params.new_shards,
            "documents_backfilled": int(prog.get("documents_backfilled", 0)),
            "per_node": dg.MetadataValue.json(dict(prog.get("per_node", {}))),
        }
    )


def _latest_shadow(instance: dg.DagsterInstance) -> tuple[int, dict[str, Any]]:
    """Storage id and metadata (plain values) of the latest ``reshard_shadow`` materialization."""
    records = instance.fetch_materializations(SHADOW_KEY, limit=1).records
    if not records:
        raise dg.Failure(description="reshard_shadow was never materialized; run the reshard first")
    record = records[0]
    mat = record.asset_materialization
    assert mat is not None
    return record.storage_id, {k: v.value for k, v in mat.metadata.items()}


def result_metadata(result: VerificationResult) -> dict[str, Any]:
    """Check metadata: counts and up to ``MAX_EXAMPLES`` divergent primary keys per kind."""
    return {
        "passed": result.passed,
        "live_documents": result.live_documents,
        "shadow_documents": result.shadow_documents,
        "missing_count": result.missing_count,
        "extra_count": result.extra_count,
        "altered_count": result.altered_count,
        "misplaced_count": result.misplaced_count,
        "divergences": dg.MetadataValue.json(
            {
                "missing": result.missing,
                "extra": result.extra,
                "altered": result.altered,
                "misplaced": result.misplaced,
                "misplaced_detail": result.misplaced_detail,
            }
        ),
        "shadow_per_node": dg.MetadataValue.json(result.shadow_per_node),
        "summary": result.summary(),
    }


@dg.asset_check(
    asset=reshard_shadow,
    name=CHECK_NAME,
    blocking=True,
    description="The shadow holds exactly the live index's primary keys and content, each document on exactly its new nodes.",
)
def shadow_matches_live(
    context: dg.AssetCheckExecutionContext, jobs: JobStoreResource
) -> dg.AssetCheckResult:
    _, meta = _latest_shadow(context.instance)
    params = _reshard_params(jobs.get_store(), str(meta["parent_job_id"]))
    live = Topology.parse(params.live_topology)
    shadow = Topology.parse(params.shadow_topology)
    result = verify_shadow(
        live,
        targets_for(live),
        shadow,
        targets_for(shadow),
        params.index_uid,
        params.shadow_uid,
        params.primary_key,
        max_examples=MAX_EXAMPLES,
    )
    (context.log.info if result.passed else context.log.error)(result.summary())
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=result_metadata(result),
    )


def latest_verification(instance: dg.DagsterInstance) -> tuple[bool, str, dict[str, Any]]:
    """Whether the latest check evaluation passed *for the latest shadow materialization*, why
    not if it did not, and the evaluation's metadata (plain values)."""
    storage_id, _ = _latest_shadow(instance)
    record = instance.get_latest_asset_check_evaluation_record(SHADOW_CHECK_KEY)
    if record is None or record.event is None or record.event.dagster_event is None:
        return False, "the shadow_matches_live check has not run yet", {}
    evaluation = record.event.dagster_event.event_specific_data
    if not isinstance(evaluation, dg.AssetCheckEvaluation):
        return False, f"the latest shadow_matches_live check is {record.status.value}, not finished", {}
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    target = evaluation.target_materialization_data
    if target is None or target.storage_id != storage_id:
        return False, "the latest shadow_matches_live check ran against an older reshard_shadow", meta
    if not evaluation.passed:
        return False, f"the latest shadow_matches_live check failed: {meta.get('summary', '')}", meta
    return True, "verified", meta


@dg.asset(
    key=["miroir", "reshard_cutover"],
    deps=[reshard_shadow],
    description="Records that the verified shadow is ready for Miroir to flip the alias; refuses an unverified shadow.",
    group_name="miroir",
)
def cutover(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
    ok, why, check_meta = latest_verification(context.instance)
    if not ok:
        raise dg.Failure(description=f"cutover refused: {why}", allow_retries=False)
    _, shadow = _latest_shadow(context.instance)
    context.log.info(
        f"shadow {shadow['shadow_index']} verified ({check_meta.get('shadow_documents')} documents): "
        f"ready for Miroir to point {shadow['index_uid']} at it"
    )
    return dg.MaterializeResult(
        metadata={
            "ready_for_cutover": True,
            "parent_job_id": shadow["parent_job_id"],
            "index_uid": shadow["index_uid"],
            "shadow_index": shadow["shadow_index"],
            "new_shards": shadow["new_shards"],
            "documents": check_meta.get("shadow_documents", 0),
            "action": json.dumps({"alias": shadow["index_uid"], "target": shadow["shadow_index"]}),
        }
    )


reshard_verify_job = dg.define_asset_job(
    "reshard_verify_job",
    selection=dg.AssetSelection.assets(reshard_shadow, cutover),
    executor_def=dg.in_process_executor,
    description="Record a backfilled shadow, verify it (blocking check), then mark it ready for cutover.",
)

#: What ``definitions.py`` adds for reshards.
RESHARD_ASSETS = [reshard_chunk, reshard_shadow, cutover]
RESHARD_ASSET_CHECKS = [shadow_matches_live]
RESHARD_JOBS: list[Any] = [plan_reshard_job, reshard_chunk_job, reshard_verify_job]
