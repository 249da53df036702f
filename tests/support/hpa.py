"""The Kubernetes HPA algorithm for the worker Deployment, to check ``k8s/hpa.yaml`` offline.

Reproduces what the horizontal-pod-autoscaler controller does with one ``External`` metric
and an ``AverageValue`` target (kube-controller-manager ``replica_calculator.go`` and
``horizontal.go``): the values of every matching series are summed, the desired count is
``ceil(sum / target)`` unless the usage ratio is within the tolerance of the current count,
then behaviour is applied (scale-up rate limits, scale-down stabilisation window, where
the recommendation used is the highest of those made inside the window), then the result
is clamped to ``[min_replicas, max_replicas]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence

from miroir_pipeline.jobs.registry import job_types as registered_job_types

__all__ = ["DEFAULT_TOLERANCE", "desired_replicas", "simulate"]

#: kube-controller-manager ``--horizontal-pod-autoscaler-tolerance`` default.
DEFAULT_TOLERANCE = 0.1
#: What the HPA selector in ``k8s/hpa.yaml`` matches: every job type.
_ALL_JOB_TYPES: tuple[str, ...] = registered_job_types()


def _check_bounds(min_replicas: int, max_replicas: int) -> None:
    if min_replicas < 1 or max_replicas < min_replicas:
        raise ValueError(
            f"need 1 <= min_replicas <= max_replicas, got min={min_replicas} max={max_replicas}"
        )


def _metric_recommendation(
    current_replicas: int, metric_values: Sequence[float], target_average: float, tolerance: float
) -> int:
    """Replicas the metric asks for, before behaviour and min/max (GetExternalMetricReplicas)."""
    if target_average <= 0:
        raise ValueError(f"target_average must be > 0, got {target_average}")
    if any(v < 0 for v in metric_values):
        raise ValueError(f"metric values must be >= 0, got {list(metric_values)}")
    usage = math.fsum(metric_values)
    if current_replicas > 0:
        usage_ratio = usage / (target_average * current_replicas)
        if abs(1.0 - usage_ratio) <= tolerance:
            return current_replicas
    return math.ceil(usage / target_average)


def desired_replicas(
    current_replicas: int,
    metric_values: Sequence[float],
    target_average: float,
    min_replicas: int,
    max_replicas: int,
    tolerance: float = DEFAULT_TOLERANCE,
) -> int:
    """One HPA decision without behaviour: ``ceil(sum(values) / target)``, or the current
    count when within ``tolerance`` of it, clamped to ``[min_replicas, max_replicas]``.

    ``metric_values`` holds one value per series matching the HPA's selector (one per
    ``job_type``); for an External ``AverageValue`` target the controller sums them.
    """
    _check_bounds(min_replicas, max_replicas)
    wanted = _metric_recommendation(current_replicas, metric_values, target_average, tolerance)
    return max(min_replicas, min(max_replicas, wanted))


def simulate(
    series: Sequence[tuple[float, Mapping[str, int]]],
    target: float = 10,
    min_replicas: int = 1,
    max_replicas: int = 20,
    scale_down_window_s: float = 300,
    sync_period_s: float = 15,
    *,
    initial_replicas: int | None = None,
    job_types: Collection[str] = _ALL_JOB_TYPES,
    tolerance: float = DEFAULT_TOLERANCE,
    scale_up_pods: int = 4,
    scale_up_percent: float = 100,
    scale_up_period_s: float = 15,
) -> list[tuple[float, int]]:
    """Replay a recorded queue-depth series through the HPA; return ``(time, replicas)`` per sync.

    ``series`` holds ``(time_s, {job_type: depth})`` samples in time order, each holding until
    the next (what Prometheus returns for a gauge pushed on every sensor tick). The HPA syncs
    every ``sync_period_s`` from the first sample to the last, reading the latest sample at
    or before the sync; only ``job_types`` count (the HPA's ``job_type In [...]`` selector).
    Behaviour matches ``k8s/hpa.yaml``: scale-up limited per ``scale_up_period_s`` to the larger
    of ``+scale_up_pods`` and ``+scale_up_percent``%, no scale-up window; scale-down uses the
    highest recommendation of the last ``scale_down_window_s`` seconds.
    """
    _check_bounds(min_replicas, max_replicas)
    if sync_period_s <= 0:
        raise ValueError(f"sync_period_s must be > 0, got {sync_period_s}")
    if not series:
        return []
    times = [t for t, _ in series]
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("series samples must be in time order")

    replicas = min_replicas if initial_replicas is None else initial_replicas
    recommendations: list[tuple[float, int]] = []
    history: list[tuple[float, int]] = []  # (time, replicas after the sync)
    out: list[tuple[float, int]] = []
    sample = 0
    step = 0
    while True:
        now = times[0] + step * sync_period_s
        if now > times[-1]:
            break
        step += 1
        while sample + 1 < len(series) and series[sample + 1][0] <= now:
            sample += 1
        depth = series[sample][1]
        values = [float(depth.get(jt, 0)) for jt in job_types]
        recommendation = _metric_recommendation(replicas, values, target, tolerance)

        # Scale-down stabilisation: the highest recommendation still inside the window.
        cutoff = now - scale_down_window_s
        recommendations = [(t, r) for t, r in recommendations if t > cutoff]
        recommendations.append((now, recommendation))
        # (kube's stabilizeRecommendationWithBehaviors with no scale-up window.)
        if recommendation < replicas:
            stabilised = min(replicas, max(r for _, r in recommendations))
        else:
            stabilised = recommendation

        if stabilised > replicas:
            # Scale-up policies: the limit counts from the replicas at the start of the period.
            period_start = next(
                (r for t, r in reversed(history) if t <= now - scale_up_period_s), replicas
            )
            period_start = min(period_start, replicas)
            limit = max(
                period_start + scale_up_pods,
                math.ceil(period_start * (1 + scale_up_percent / 100)),
            )
            stabilised = min(stabilised, limit)
        replicas = max(min_replicas, min(max_replicas, stabilised))
        history.append((now, replicas))
        out.append((now, replicas))
    return out
