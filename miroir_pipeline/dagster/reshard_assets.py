"""Reshard in Dagster, beyond its generic chunk asset: an op job that plans a reshard (prepare the
shadow, split the shard-id space, register one partition per range), the ``reshard_shadow`` asset
with a blocking check that the shadow equals the live index, and the ``reshard_cutover`` asset
that only runs on a verified shadow.

The alias flip itself stays with Miroir: the cutover asset records that the shadow is verified
and ready (metadata and a log line) for Miroir to act on.
"""

import json
from collections.abc import Sequence
from typing import Any

import dagster as dg

from miroir_pipeline.dagster.names import DEFAULT_KEY_PREFIX, MiroirNames
from miroir_pipeline.dagster.resources import (
    JobStoreResource,
    SettingsResource,
    TopologyResource,
    targets_for,
)
from miroir_pipeline.fleet.topology import Topology, load_topology
from miroir_pipeline.jobs.registry import JobKind
from miroir_pipeline.jobs.reshard_backfill import ReshardChunkParams, ReshardRequest, plan_reshard
from miroir_pipeline.jobs.reshard_backfill.verification import VerificationResult, verify_shadow
from miroir_pipeline.queue.contract import JobState, JobStore

__all__ = [
    "MAX_EXAMPLES",
    "ReshardConfig",
    "ReshardShadowConfig",
    "latest_verification",
    "reshard_definitions",
    "result_metadata",
]

#: Divergent primary keys shown per kind in the check's metadata.
MAX_EXAMPLES = 20


class ReshardConfig(dg.Config):
    """A reshard request, as run config (the launchpad form in the UI)."""

    index_uid: str
    new_shards: int
    shards_per_chunk: int = 8
    new_topology_path: str | None = None
    replace_shadow: bool = False


class ReshardShadowConfig(dg.Config):
    """Which reshard's shadow to record: the parent job id the plan returned."""

    parent_job_id: str


def _reshard_params(store: JobStore, parent_id: str) -> ReshardChunkParams:
    """The shared part of a reshard's chunk params (uids, primary key, both topologies)."""
    children = store.children(parent_id)
    if not children:
        raise dg.Failure(description=f"reshard {parent_id} has no chunks; was it planned?")
    return ReshardChunkParams.model_validate(children[0].params)


def _latest_shadow(
    instance: dg.DagsterInstance, names: MiroirNames, run_id: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Storage id and metadata (plain values) of the ``reshard_shadow`` materialization of run
    ``run_id``, or of the run it re-executes (and so on), when one made it: the shadow that run
    verifies, as another reshard's verify run may have materialized the asset since. Else the
    latest one."""
    found = _run_shadow(instance, names, run_id) if run_id is not None else None
    if found is not None:
        return found[0], found[1]
    records = instance.fetch_materializations(names.reshard_shadow_key, limit=1).records
    if not records:
        raise dg.Failure(
            description=f"{names.reshard_shadow_key.to_user_string()} was never materialized; run the reshard first"
        )
    record = records[0]
    mat = record.asset_materialization
    assert mat is not None
    return record.storage_id, {k: v.value for k, v in mat.metadata.items()}


def _own_or_latest_shadow(instance: dg.DagsterInstance, names: MiroirNames, run_id: str) -> dict[str, Any]:
    """Metadata of the ``reshard_shadow`` materialization run ``run_id`` made itself, else of
    the latest one (runs it re-executes are not looked at)."""
    for record in _run_records(instance, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION):
        mat = record.asset_materialization
        if mat is not None and mat.asset_key == names.reshard_shadow_key:
            return {k: v.value for k, v in mat.metadata.items()}
    return _latest_shadow(instance, names)[1]


def _run_shadow(
    instance: dg.DagsterInstance, names: MiroirNames, run_id: str
) -> tuple[int, dict[str, Any], str] | None:
    """The ``reshard_shadow`` materialization of ``run_id`` or of the nearest run it re-executes
    (a re-execution from failure skips the steps that succeeded), and the run that made it."""
    for rid in _run_chain(instance, run_id):
        for record in _run_records(instance, rid, dg.DagsterEventType.ASSET_MATERIALIZATION):
            mat = record.asset_materialization
            if mat is not None and mat.asset_key == names.reshard_shadow_key:
                return record.storage_id, {k: v.value for k, v in mat.metadata.items()}, rid
    return None


def _run_chain(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """``run_id``, the run it re-executes, that run's parent, and so on."""
    chain: list[str] = []
    rid: str | None = run_id
    while rid is not None and rid not in chain:
        chain.append(rid)
        run = instance.get_run_by_id(rid)
        rid = run.parent_run_id if run is not None else None
    return chain


def _run_records(
    instance: dg.DagsterInstance, run_id: str, of_type: dg.DagsterEventType
) -> list[dg.EventLogRecord]:
    """Events of one type a run logged, newest first."""
    return list(instance.get_records_for_run(run_id, of_type=of_type, ascending=False).records)


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


def latest_verification(
    instance: dg.DagsterInstance, key_prefix: str = DEFAULT_KEY_PREFIX, run_id: str | None = None
) -> tuple[bool, str, dict[str, Any]]:
    """Whether the check passed *for the shadow it was meant to verify*, why not if it did not,
    and the evaluation's metadata (plain values); for the definitions built with ``key_prefix``.

    With ``run_id`` (a verify run, or a re-execution of one), the shadow and the check
    evaluation are that run's own or those of the runs it re-executes, the newest first, so a
    verify run of another reshard finishing meanwhile is never reported; without it, the
    latest evaluation must target the latest shadow materialization."""
    names = MiroirNames(key_prefix)
    check = names.shadow_check_name
    event: dg.EventLogEntry | None = None
    if run_id is not None:
        found = _run_shadow(instance, names, run_id)
        if found is None:
            return False, f"no {names.reshard_shadow_key.to_user_string()} was recorded in this verify run", {}
        storage_id, shadow, shadow_run = found
        chain = _run_chain(instance, run_id)
        # The check of a later re-execution wins; none older than the shadow's own run counts.
        event = _run_check_evaluation(instance, names, chain[: chain.index(shadow_run) + 1])
        run_id = shadow_run  # the evaluation must target the shadow of that run
        if event is None:
            return False, f"the {check} check did not run in this verify run", {}
    else:
        storage_id, shadow = _latest_shadow(instance, names)
        latest = instance.get_latest_asset_check_evaluation_record(names.shadow_check_key)
        if latest is None or latest.event is None:
            return False, f"the {check} check has not run yet", {}
        event = latest.event
        if event.dagster_event is None or not isinstance(
            event.dagster_event.event_specific_data, dg.AssetCheckEvaluation
        ):
            return False, f"the latest {check} check is {latest.status.value}, not finished", {}
    assert event.dagster_event is not None
    evaluation = event.dagster_event.event_specific_data
    assert isinstance(evaluation, dg.AssetCheckEvaluation)
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    target = evaluation.target_materialization_data
    # A run's own records may be numbered apart from the asset index (run-sharded storage):
    # within a run, the check must target the shadow that run materialized.
    if target is None or (target.run_id != run_id if run_id else target.storage_id != storage_id):
        return False, f"the latest {check} check ran against an older reshard_shadow", meta
    meta.setdefault("parent_job_id", shadow.get("parent_job_id"))
    if not evaluation.passed:
        return False, f"the latest {check} check failed: {meta.get('summary', '')}", meta
    return True, "verified", meta


def _run_check_evaluation(
    instance: dg.DagsterInstance, names: MiroirNames, run_ids: Sequence[str]
) -> dg.EventLogEntry | None:
    """The newest evaluation of the shadow check in the first of ``run_ids`` that has one."""
    for rid in run_ids:
        for record in _run_records(instance, rid, dg.DagsterEventType.ASSET_CHECK_EVALUATION):
            evaluation = record.event_log_entry.dagster_event.event_specific_data  # type: ignore[union-attr]
            if isinstance(evaluation, dg.AssetCheckEvaluation) and evaluation.asset_check_key == names.shadow_check_key:
                return record.event_log_entry
    return None


def reshard_definitions(names: MiroirNames, kind: JobKind) -> dg.Definitions:
    """The plan job, shadow asset, its blocking check, the cutover asset and the verify job of
    reshards, for the definitions named by ``names``."""
    jobs_key, topology_key, settings_key = (
        names.jobs_resource,
        names.topology_resource,
        names.settings_resource,
    )
    partitions_name = names.partitions(kind)
    parents_name = names.parent_partitions(kind)
    chunk_asset = names.chunk_asset_key(kind).to_user_string()

    @dg.op(
        name=names.plan_reshard_op,
        out=dg.Out(io_manager_key=names.results_io_manager),
        description=(
            "Check the live index, prepare the shadow index, enqueue the reshard parent, split it "
            f"into shard ranges, and register one partition of {chunk_asset} per range."
        ),
        required_resource_keys={jobs_key, topology_key, settings_key},
    )
    def _plan(context: dg.OpExecutionContext, config: ReshardConfig) -> str:
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        topology: TopologyResource = getattr(context.resources, topology_key)
        settings: SettingsResource = getattr(context.resources, settings_key)
        live = topology.get_topology()
        new = load_topology(config.new_topology_path) if config.new_topology_path else None
        request = ReshardRequest(
            index_uid=config.index_uid,
            new_shards=config.new_shards,
            shards_per_chunk=config.shards_per_chunk,
            replace_shadow=config.replace_shadow,
        )
        live_targets = targets_for(live)
        planned = plan_reshard(
            jobs.get_store(),
            request,
            live,
            live_targets,
            settings.get_settings(),
            new_topology=new,
            shadow_targets=targets_for(new) if new is not None else live_targets,
        )
        context.instance.add_dynamic_partitions(partitions_name, planned.chunk_ids)
        context.instance.add_dynamic_partitions(parents_name, [planned.parent.id])
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

    @dg.job(
        name=names.plan_reshard_job,
        # One op, whose result stays in memory: a run of it never needs another process.
        executor_def=dg.in_process_executor,
        description=f"Plan a reshard: one dynamic partition of {chunk_asset} per shard range.",
    )
    def _plan_job() -> None:
        _plan()

    @dg.asset(
        key=names.reshard_shadow_key,
        description="The shadow index of a completed reshard backfill, recorded for verification and cutover.",
        group_name=names.group_name,
        required_resource_keys={jobs_key},
    )
    def _shadow(context: dg.AssetExecutionContext, config: ReshardShadowConfig) -> dg.MaterializeResult:  # type: ignore[type-arg]
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
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
                "documents_backfilled": int(prog.get(kind.documents_key, 0)),
                "per_node": dg.MetadataValue.json(dict(prog.get("per_node", {}))),
            }
        )

    @dg.asset_check(
        asset=_shadow,
        name=names.shadow_check_name,
        blocking=True,
        description=(
            "The shadow holds exactly the live index's primary keys and content, each document on "
            "exactly its new nodes."
        ),
        required_resource_keys={jobs_key},
    )
    def _shadow_matches_live(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        # The shadow this run materialized, else the latest: Dagster records the evaluation
        # against the latest materialization, so a re-executed check must not verify an older
        # shadow of the run it re-executes (it would be recorded as verifying another one).
        meta = _own_or_latest_shadow(context.instance, names, context.run.run_id)
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

    @dg.asset(
        key=names.reshard_cutover_key,
        deps=[_shadow],
        description="Records that the verified shadow is ready for Miroir to flip the alias; refuses an unverified shadow.",
        group_name=names.group_name,
    )
    def _cutover(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        # In a verify run (or a re-execution of one): that run's shadow and check; materialized
        # on its own: the latest.
        this_run = context.run.run_id
        run_id = this_run if _run_shadow(context.instance, names, this_run) is not None else None
        ok, why, check_meta = latest_verification(context.instance, names.key_prefix, run_id)
        if not ok:
            raise dg.Failure(description=f"cutover refused: {why}", allow_retries=False)
        _, shadow = _latest_shadow(context.instance, names, run_id)
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

    verify_job = dg.define_asset_job(
        names.reshard_verify_job,
        selection=dg.AssetSelection.assets(_shadow, _cutover),
        executor_def=dg.in_process_executor,
        description="Record a backfilled shadow, verify it (blocking check), then mark it ready for cutover.",
    )
    return dg.Definitions(
        assets=[_shadow, _cutover],
        asset_checks=[_shadow_matches_live],
        jobs=[_plan_job, verify_job],
    )
