"""The queue-depth push against a real Pushgateway: what the HPA's adapter will read."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import CollectorRegistry, Summary, push_to_gateway

from miroir_pipeline.jobs.registry import job_types
from miroir_pipeline.metrics import (
    DEPLOYMENT_ENV,
    JOB_TYPE_LABEL,
    KEY_PREFIX_LABEL,
    PUSH_JOB,
    PUSHGATEWAY_URL_ENV,
    QUEUE_DEPTH_METRIC,
    MetricsPushError,
    push_queue_depth,
    push_queue_depth_from_env,
)
from tests.fixtures.pushgateway import Pushgateway, samples_of


@pytest.fixture
def gateway(pushgateway: Pushgateway) -> Pushgateway:
    pushgateway.wipe()
    return pushgateway


def _depths(gateway: Pushgateway, deployment: str) -> dict[str, float]:
    """job_type → value of the queue-depth series pushed for ``deployment``."""
    found = samples_of(gateway.scrape(), QUEUE_DEPTH_METRIC, job=PUSH_JOB, deployment=deployment)
    return {s.labels[JOB_TYPE_LABEL]: s.value for s in found}


def test_push_shows_each_job_type_with_grouping_labels(gateway: Pushgateway) -> None:
    push_queue_depth(
        gateway.url,
        {"dump_import": 40, "reshard_backfill": 3},
        grouping_key={"deployment": "prod"},
    )

    series = samples_of(gateway.scrape(), QUEUE_DEPTH_METRIC)
    assert {
        (s.labels["job"], s.labels["deployment"], s.labels[JOB_TYPE_LABEL]) for s in series
    } == {
        (PUSH_JOB, "prod", "dump_import"),
        (PUSH_JOB, "prod", "reshard_backfill"),
    }
    assert _depths(gateway, "prod") == {"dump_import": 40.0, "reshard_backfill": 3.0}


def test_a_drained_type_is_pushed_as_zero(gateway: Pushgateway) -> None:
    # Callers pass every registered type (``store.queue_depth(job_types())`` does), so a type
    # that drained replaces its old value with 0 instead of keeping the autoscaler up.
    idle = dict.fromkeys(job_types(), 0)
    push_queue_depth(gateway.url, {**idle, "dump_import": 40}, grouping_key={"deployment": "prod"})
    assert _depths(gateway, "prod") == {"dump_import": 40.0, "reshard_backfill": 0.0}

    push_queue_depth(gateway.url, idle, grouping_key={"deployment": "prod"})

    assert _depths(gateway, "prod") == {t: 0.0 for t in job_types()}


def test_push_drops_series_of_a_type_no_longer_reported(gateway: Pushgateway) -> None:
    push_queue_depth(gateway.url, {"legacy_type": 5}, grouping_key={"deployment": "prod"})
    assert _depths(gateway, "prod")["legacy_type"] == 5.0

    push_queue_depth(gateway.url, {"dump_import": 1}, grouping_key={"deployment": "prod"})

    assert _depths(gateway, "prod") == {"dump_import": 1.0}


def test_two_key_prefixes_in_one_deployment_keep_their_own_depths(
    gateway: Pushgateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sets of definitions (default prefix and ``fleet_b``) push under one deployment: each
    push replaces only its own group, so neither wipes the other's depths; the default prefix
    keeps the plain group (no stale group left behind on upgrade)."""
    from miroir_pipeline.dagster.resources import PushgatewayResource

    monkeypatch.delenv(PUSHGATEWAY_URL_ENV, raising=False)
    default = PushgatewayResource(url=gateway.url, deployment="prod")
    fleet_b = PushgatewayResource(url=gateway.url, deployment="prod", key_prefix="fleet_b")
    assert default.push({"dump_import": 4}) and fleet_b.push({"dump_import": 11})
    assert default.push({"dump_import": 5})
    series = samples_of(gateway.scrape(), QUEUE_DEPTH_METRIC, job=PUSH_JOB, deployment="prod")
    assert sorted((s.labels.get(KEY_PREFIX_LABEL, ""), s.value) for s in series) == [("", 5.0), ("fleet_b", 11.0)]


def test_deployments_are_separate_groups(gateway: Pushgateway) -> None:
    push_queue_depth(gateway.url, {"dump_import": 7}, grouping_key={"deployment": "staging"})
    push_queue_depth(gateway.url, {"dump_import": 9}, grouping_key={"deployment": "prod"})

    assert _depths(gateway, "staging")["dump_import"] == 7.0
    assert _depths(gateway, "prod")["dump_import"] == 9.0


def test_push_from_env_uses_url_and_deployment(gateway: Pushgateway) -> None:
    deployment = f"env-{uuid.uuid4().hex[:8]}"
    env = {PUSHGATEWAY_URL_ENV: gateway.url, DEPLOYMENT_ENV: deployment}

    assert push_queue_depth_from_env({"reshard_backfill": 12}, env) is True

    assert _depths(gateway, deployment) == {"reshard_backfill": 12.0}
    assert push_queue_depth_from_env({"reshard_backfill": 12}, {}) is False


def test_gateway_rejection_is_a_clear_error(gateway: Pushgateway) -> None:
    # The gateway refuses a push whose metric type clashes with the same name in another
    # group; the real gateway produces this fault, no fake needed.
    clash = CollectorRegistry()
    Summary(QUEUE_DEPTH_METRIC, "wrong type", registry=clash).observe(1)
    push_to_gateway(gateway.url, job="other", registry=clash, timeout=5)

    with pytest.raises(
        MetricsPushError, match=r"Pushgateway http://127\.0\.0\.1:\d+ refused .*HTTP 400"
    ):
        push_queue_depth(gateway.url, {"dump_import": 1}, grouping_key={"deployment": "prod"})
