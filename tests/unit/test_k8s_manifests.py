"""k8s/ manifests agree with the code (metric names, labels, env, lease TTL) and the HPA
behaves as designed on a recorded queue-depth series (tests.support.hpa)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.registry import job_types
from miroir_pipeline.metrics import (
    DEPLOYMENT_ENV,
    DEPLOYMENT_LABEL,
    JOB_TYPE_LABEL,
    METRICS_PORT_ENV,
    PUSH_JOB,
    PUSHGATEWAY_URL_ENV,
    QUEUE_DEPTH_METRIC,
)
from miroir_pipeline.queue.contract import DEFAULT_LEASE_TTL
from tests.support.hpa import desired_replicas, simulate

K8S = Path(__file__).resolve().parents[2] / "k8s"
NOT_MANIFESTS = {"kustomization.yaml", "secret.example.yaml", "dagster-values.yaml"}
#: Labels of the pushed queue-depth series: job_type plus the Pushgateway grouping key.
PUSHED_LABELS = {JOB_TYPE_LABEL, "job", DEPLOYMENT_LABEL}
#: Miroir's worker envelope: 2 vCPU / 3.75 GB (GCE-style GB, i.e. GiB).
MAX_CPU = 2.0
MAX_MEMORY = int(3.75 * 2**30)


def docs(name: str) -> list[dict[str, Any]]:
    with (K8S / name).open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def cpu(q: str | int | float) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def memory(q: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?|k)?", str(q))
    assert m, f"unparsed memory quantity {q!r}"
    return int(float(m.group(1)) * units.get(m.group(2) or "", 1))


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def worker_container() -> dict[str, Any]:
    (container,) = one("worker-deployment.yaml", "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    return container


def user_deployment() -> dict[str, Any]:
    values = docs("dagster-values.yaml")[0]
    (dep,) = values["dagster-user-deployments"]["deployments"]
    return dep


def selector_labels(promql_selector: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """``name{a="x",b!=""}`` → (name, {label: (op, value)})."""
    m = re.fullmatch(r"\s*(\w+)\{(.*)\}\s*", promql_selector)
    assert m, promql_selector
    labels = {
        lm.group(1): (lm.group(2), lm.group(3))
        for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(2))
    }
    return m.group(1), labels


# -- files and kustomization ----------------------------------------------------------------


def test_every_file_parses_and_kustomization_lists_every_manifest() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    for name in files:
        assert docs(name), f"{name} is empty"
    manifests = set(files) - NOT_MANIFESTS
    for name in manifests:
        for d in docs(name):
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), name
    kustomization = docs("kustomization.yaml")[0]
    assert set(kustomization["resources"]) == manifests
    assert (K8S / "README.md").is_file()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout) if d]
    assert kinds.count("Deployment") == 2 and "HorizontalPodAutoscaler" in kinds


# -- worker ---------------------------------------------------------------------------------


def test_worker_deployment_env_probes_and_shutdown() -> None:
    dep = one("worker-deployment.yaml", "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = worker_container()
    assert [*c.get("command", []), *c.get("args", [])][-1] == "worker"
    assert pod["terminationGracePeriodSeconds"] > DEFAULT_LEASE_TTL
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (
        dep["spec"]["selector"]["matchLabels"].items()
        <= dep["spec"]["template"]["metadata"]["labels"].items()
    )

    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "value" not in env["MIROIR_JOBS_DSN"]
    assert env["MIROIR_JOBS_DSN"]["valueFrom"]["secretKeyRef"]["key"]
    assert "DAGSTER_HOME" in env and "MIROIR_TOPOLOGY" in env

    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", 9108)
    assert env[METRICS_PORT_ENV]["value"] == "9108"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_worker_resources_fit_miroir_envelope() -> None:
    res = worker_container()["resources"]
    assert 0 < cpu(res["requests"]["cpu"]) <= cpu(res["limits"]["cpu"]) <= MAX_CPU
    assert 0 < memory(res["requests"]["memory"]) <= memory(res["limits"]["memory"]) <= MAX_MEMORY


def test_worker_config_files_are_mounted_and_valid(tmp_path: Path) -> None:
    c = worker_container()
    env = env_of(c)
    config = one("worker-config.yaml", "ConfigMap")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in one("worker-deployment.yaml", "Deployment")["spec"]["template"]["spec"]["volumes"]
    }

    def mounted_key(path: str) -> str:
        mount = mounts[path]
        assert volumes[mount["name"]]["configMap"]["name"] == config["metadata"]["name"]
        return str(mount["subPath"])

    topo_key = mounted_key(env["MIROIR_TOPOLOGY"]["value"])
    dagster_key = mounted_key(f"{env['DAGSTER_HOME']['value']}/dagster.yaml")
    assert env["DAGSTER_HOME"]["value"] in mounts  # writable home around the read-only file

    topology = Topology.parse(yaml.safe_load(config["data"][topo_key]), "worker-config.yaml")
    for node in topology.all_nodes():
        key_env = env.get(node.api_key_env or "")
        assert key_env and "secretKeyRef" in key_env["valueFrom"], node.id

    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text(config["data"][dagster_key])
    instance_config, _ = dagster_instance_config(str(tmp_path))
    assert "postgres" in instance_config["storage"]
    for field in ("hostname", "port", "username", "password", "db_name"):
        var = yaml.safe_load(config["data"][dagster_key])["storage"]["postgres"]["postgres_db"][
            field
        ]["env"]
        assert var in env, f"dagster.yaml reads ${var}, which the worker does not set"


def test_staging_and_dead_letters_are_one_shared_volume_for_workers_and_dagster_runs() -> None:
    """A dump is expanded where its import is planned (a Dagster run pod, say) and read by the
    pods that run its chunks; a chunk handed back on a scale-down resumes its dead-letter file
    in another pod. Both directories must be the same, on a ReadWriteMany volume, in the
    worker pods and in the code location whose launched runs inherit its config."""
    claim = one("shared-storage.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    worker_pod = one("worker-deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    user = user_deployment()
    assert user["includeConfigInLaunchedRuns"]["enabled"] is True
    places = {
        "worker": (env_of(worker_container()), worker_container()["volumeMounts"], worker_pod["volumes"]),
        "code location": (env_of(user), user["volumeMounts"], user["volumes"]),
    }
    dirs = {}
    for where, (env, mounts, volumes) in places.items():
        by_name = {v["name"]: v for v in volumes}
        for var in ("MIROIR_STAGING_DIR", "MIROIR_DEAD_LETTER_DIR"):
            path = env[var]["value"]
            dirs.setdefault(var, set()).add(path)
            (mount,) = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
            volume = by_name[mount["name"]]
            assert volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"], (where, var)
    assert all(len(paths) == 1 for paths in dirs.values()), dirs


def test_worker_service_is_headless_and_exposes_metrics() -> None:
    svc = one("worker-service.yaml", "Service")
    pod_labels = one("worker-deployment.yaml", "Deployment")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert {(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]} == {("metrics", "metrics")}


# -- secrets ----------------------------------------------------------------------------------


def test_example_secret_holds_placeholders_for_every_referenced_key() -> None:
    provided = set()
    for secret in docs("secret.example.yaml"):
        assert secret["kind"] == "Secret"
        for key, value in secret["stringData"].items():
            assert "CHANGE_ME" in value, f"{key} in secret.example.yaml must be a placeholder"
            provided.add((secret["metadata"]["name"], key))
    referenced = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in [*worker_container()["env"], *user_deployment()["env"]]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert referenced <= provided
    values = docs("dagster-values.yaml")[0]
    assert (values["global"]["postgresqlSecretName"], "postgresql-password") in provided


# -- metric plumbing ------------------------------------------------------------------------


def hpa_metric() -> dict[str, Any]:
    (metric,) = one("hpa.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "External"
    return dict(metric["external"])


def test_hpa_scales_worker_on_queue_depth() -> None:
    hpa = one("hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        one("worker-deployment.yaml", "Deployment")["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] >= 2
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300

    metric = hpa_metric()
    assert metric["metric"]["name"] == QUEUE_DEPTH_METRIC
    assert metric["target"] == {"type": "AverageValue", "averageValue": "10"}
    selector = metric["metric"]["selector"]
    (expr,) = selector["matchExpressions"]
    assert (expr["key"], expr["operator"]) == (JOB_TYPE_LABEL, "In")
    assert set(expr["values"]) == set(job_types())
    # Matches exactly what the sensor pushes (dagster-values.yaml env of the code location).
    sensor_env = env_of(user_deployment())
    assert selector["matchLabels"] == {
        "job": PUSH_JOB,
        DEPLOYMENT_LABEL: sensor_env[DEPLOYMENT_ENV]["value"],
    }


def test_adapter_rule_serves_the_pushed_metric() -> None:
    config = yaml.safe_load(
        one("prometheus-adapter-rules.yaml", "ConfigMap")["data"]["config.yaml"]
    )
    (rule,) = config["externalRules"]
    name, labels = selector_labels(rule["seriesQuery"])
    assert name == QUEUE_DEPTH_METRIC
    assert labels[JOB_TYPE_LABEL] == ("!=", "")
    assert labels["job"] == ("=", PUSH_JOB)
    assert set(labels) <= PUSHED_LABELS
    assert rule["name"]["as"] == QUEUE_DEPTH_METRIC
    assert re.fullmatch(rule["name"]["matches"], QUEUE_DEPTH_METRIC)
    assert rule["resources"] == {"namespaced": False}
    assert re.fullmatch(
        rf"sum\(<<\.Series>>\{{<<\.LabelMatchers>>\}}\) by \({JOB_TYPE_LABEL}\)",
        rule["metricsQuery"],
    )
    hpa_labels = set(hpa_metric()["metric"]["selector"]["matchLabels"]) | {JOB_TYPE_LABEL}
    assert hpa_labels <= PUSHED_LABELS


def test_backlog_alert() -> None:
    rules = [
        r
        for g in one("prometheusrule.yaml", "PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
    ]
    (alert,) = [r for r in rules if r.get("alert") == "MiroirBackgroundJobBacklog"]
    selector, threshold = alert["expr"].split(">")
    name, labels = selector_labels(selector)
    assert name == QUEUE_DEPTH_METRIC and labels == {"job": ("=", PUSH_JOB)}
    assert float(threshold) == 100
    assert alert["for"] == "10m"
    assert alert["labels"]["severity"]
    assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    used = set(re.findall(r"\$labels\.(\w+)", str(alert["annotations"])))
    assert used and used <= PUSHED_LABELS
    for rule in rules:
        if "alert" in rule:
            assert 'job="miroir_pipeline"' in rule["expr"], rule["alert"]


def test_pushgateway_service_monitors_and_sensor_url() -> None:
    dep = one("pushgateway.yaml", "Deployment")
    svc = one("pushgateway.yaml", "Service")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("prom/pushgateway:")
    assert {p["containerPort"] for p in c["ports"]} == {9091}
    assert {p["port"] for p in svc["spec"]["ports"]} == {9091}
    namespace = docs("kustomization.yaml")[0]["namespace"]
    url = env_of(user_deployment())[PUSHGATEWAY_URL_ENV]["value"]
    assert url.startswith(f"http://{svc['metadata']['name']}.{namespace}.")
    assert url.endswith(":9091")

    monitors = {m["metadata"]["name"]: m for m in docs("servicemonitor.yaml")}
    assert all(m["apiVersion"] == "monitoring.coreos.com/v1" for m in monitors.values())
    by_service = {}
    for service in (svc, one("worker-service.yaml", "Service")):
        for m in monitors.values():
            if (
                m["spec"]["selector"]["matchLabels"].items()
                <= service["metadata"]["labels"].items()
            ):
                by_service[service["metadata"]["name"]] = m
    assert set(by_service) == {svc["metadata"]["name"], "miroir-worker-metrics"}
    (gw_endpoint,) = by_service[svc["metadata"]["name"]]["spec"]["endpoints"]
    assert gw_endpoint["honorLabels"] is True
    (worker_endpoint,) = by_service["miroir-worker-metrics"]["spec"]["endpoints"]
    assert worker_endpoint["port"] == "metrics"


def test_dagster_values() -> None:
    values = docs("dagster-values.yaml")[0]
    assert values["postgresql"]["enabled"] is False and values["postgresql"]["postgresqlHost"]
    assert values["generatePostgresqlPasswordSecret"] is False
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"] is True
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    limits = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    worker_dagster = yaml.safe_load(one("worker-config.yaml", "ConfigMap")["data"]["dagster.yaml"])
    assert limits == worker_dagster["run_queue"]["tag_concurrency_limits"]
    assert {lim["key"] for lim in limits} == {"miroir/chunk-run"}
    dep = user_deployment()
    assert any(a.endswith("definitions.py") for a in dep["dagsterApiGrpcArgs"])
    assert dep["includeConfigInLaunchedRuns"]["enabled"] is True


# -- HPA model --------------------------------------------------------------------------------


def test_desired_replicas_formula() -> None:
    assert desired_replicas(1, [40], 10, 1, 20) == 4
    assert desired_replicas(1, [25, 15], 10, 1, 20) == 4  # series summed
    assert desired_replicas(4, [42], 10, 1, 20) == 4  # within 10 % tolerance
    assert desired_replicas(4, [45], 10, 1, 20) == 5
    assert desired_replicas(4, [0, 0], 10, 1, 20) == 1  # clamped to min
    assert desired_replicas(4, [1000], 10, 1, 20) == 20  # clamped to max
    assert desired_replicas(3, [1], 10, 1, 20) == 1
    with pytest.raises(ValueError):
        desired_replicas(1, [1], 0, 1, 20)
    with pytest.raises(ValueError):
        desired_replicas(1, [-1], 10, 1, 20)
    with pytest.raises(ValueError):
        desired_replicas(1, [1], 10, 3, 2)


def hpa_params() -> dict[str, float]:
    spec = one("hpa.yaml", "HorizontalPodAutoscaler")["spec"]
    return {
        "target": float(hpa_metric()["target"]["averageValue"]),
        "min_replicas": spec["minReplicas"],
        "max_replicas": spec["maxReplicas"],
        "scale_down_window_s": spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
    }


def test_simulation_scales_to_queue_then_down_only_after_window() -> None:
    drained_at = 600.0
    series = [(0.0, {"dump_import": 40}), (drained_at, {}), (1500.0, {})]
    result = dict(simulate(series, **hpa_params()))  # type: ignore[arg-type]

    last_high = max(t for t in result if t < drained_at)  # last sync that saw 40 queued
    for t, replicas in result.items():
        if t < last_high + 300:
            assert replicas == 4, f"t={t}: {replicas} replicas"
        else:
            assert replicas == 1, f"t={t}: {replicas} replicas"
    assert any(drained_at <= t < last_high + 300 for t in result)  # the window was exercised


def test_simulation_ignores_a_short_dip_and_counts_both_job_types() -> None:
    series = [
        (0.0, {"dump_import": 25, "reshard_backfill": 15}),
        (120.0, {}),  # queue briefly empty between two dumps
        (180.0, {"dump_import": 40}),
        (600.0, {"dump_import": 40}),
    ]
    assert {r for _, r in simulate(series, **hpa_params())} == {4}  # type: ignore[arg-type]


def test_simulation_scale_up_follows_hpa_yaml_rate_policies() -> None:
    behaviour = one("hpa.yaml", "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleUp"]
    policies = {p["type"]: (p["value"], p["periodSeconds"]) for p in behaviour["policies"]}
    assert behaviour["selectPolicy"] == "Max"
    assert behaviour["stabilizationWindowSeconds"] == 0
    series = [(0.0, {"dump_import": 400}), (60.0, {"dump_import": 400})]
    result = simulate(
        series,
        **hpa_params(),  # type: ignore[arg-type]
        scale_up_pods=policies["Pods"][0],
        scale_up_percent=policies["Percent"][0],
        scale_up_period_s=policies["Pods"][1],
    )
    # 1 → +4 pods; 5 → +100 %; 10 → +100 %; capped at maxReplicas.
    assert [r for _, r in result] == [5, 10, 20, 20, 20]
