"""Prometheus metrics of miroir-pipeline, all defined in this one module.

Two audiences:

* **Workers** serve the process-wide counters and histograms below on ``/metrics``
  (:func:`start_metrics_server`); they live in ``prometheus_client``'s default registry.
* **The queue-depth sensor** pushes ``miroir_background_queue_depth{job_type}`` to a
  Pushgateway (:func:`push_queue_depth`), where the Kubernetes HPA reads it through
  prometheus-adapter. That gauge lives in its own registry, so a worker's ``/metrics``
  never carries a second copy of the queue depth that would be double counted.

The pushed series carry ``job_type`` plus the grouping-key labels ``job`` (always
:data:`PUSH_JOB`) and ``deployment``; ``k8s/hpa.yaml``, ``k8s/prometheus-adapter-rules.yaml``
and ``k8s/prometheusrule.yaml`` select on exactly those labels.
"""

from __future__ import annotations

import http.client
import os
import threading
import urllib.error
from collections.abc import Mapping
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
)

__all__ = [
    "CHUNK_CLAIMS",
    "CHUNK_DURATION",
    "CHUNK_LEASE_LOSSES",
    "CHUNK_OUTCOMES",
    "CHUNK_RECLAIMS",
    "DEFAULT_PUSH_TIMEOUT",
    "DEPLOYMENT_ENV",
    "DEPLOYMENT_LABEL",
    "DUMP_IMPORT_BYTES_READ",
    "DUMP_IMPORT_DOCUMENTS_ROUTED",
    "INVALID_DOCUMENTS",
    "INVALID_DOCUMENT_POLICIES",
    "JOB_TYPE_LABEL",
    "KEY_PREFIX_LABEL",
    "METRICS_ADDR_ENV",
    "METRICS_PORTS",
    "METRICS_PORT_ENV",
    "PUSHGATEWAY_URL_ENV",
    "PUSH_JOB",
    "QUEUE_DEPTH",
    "QUEUE_DEPTH_METRIC",
    "QUEUE_DEPTH_REGISTRY",
    "RESHARD_DOCUMENTS_BACKFILLED",
    "CommittedCount",
    "MetricsPushError",
    "parse_port",
    "prime_job_type",
    "push_queue_depth",
    "push_queue_depth_from_env",
    "start_metrics_server",
    "start_metrics_server_from_env",
]

#: Name of the queue-depth gauge; the HPA, adapter rule and alert use exactly this name.
QUEUE_DEPTH_METRIC: Final = "miroir_background_queue_depth"
#: Label carrying a job kind's ``job_type`` (a row's ``type``).
JOB_TYPE_LABEL: Final = "job_type"
#: Pushgateway ``job`` grouping label of every push.
PUSH_JOB: Final = "miroir_pipeline"
#: Grouping-key label that keeps two deployments (e.g. staging and production) apart.
DEPLOYMENT_LABEL: Final = "deployment"
#: Grouping label of the queue depth pushed by definitions built with a non-default key prefix.
KEY_PREFIX_LABEL: Final = "key_prefix"
DEFAULT_PUSH_TIMEOUT: Final = 10.0

#: Environment read by :func:`push_queue_depth_from_env` and :func:`start_metrics_server_from_env`.
PUSHGATEWAY_URL_ENV: Final = "MIROIR_PUSHGATEWAY_URL"
DEPLOYMENT_ENV: Final = "MIROIR_DEPLOYMENT"
METRICS_PORT_ENV: Final = "MIROIR_METRICS_PORT"
METRICS_ADDR_ENV: Final = "MIROIR_METRICS_ADDR"
DEFAULT_DEPLOYMENT: Final = "default"
#: The ports :func:`start_metrics_server` serves on (0: the system picks a free one); the one rule
#: for ``$MIROIR_METRICS_PORT`` and ``worker --metrics-port`` (see :func:`parse_port`).
METRICS_PORTS: Final = range(0, 65536)

#: ``outcome`` label values of :data:`CHUNK_DURATION`.
CHUNK_OUTCOMES: Final = ("completed", "failed", "lease_lost", "released")
#: ``policy`` label values of :data:`INVALID_DOCUMENTS` (stop, or dead-letter and skip).
INVALID_DOCUMENT_POLICIES: Final = ("fail", "skip")

# Chunks take from seconds (small dumps, tests) to tens of minutes (256 MiB over slow nodes).
_CHUNK_DURATION_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

# -- pushed by the queue-depth sensor ----------------------------------------------------------
QUEUE_DEPTH_REGISTRY: Final = CollectorRegistry(auto_describe=True)
QUEUE_DEPTH: Final = Gauge(
    QUEUE_DEPTH_METRIC,
    "Claimable background chunks (queued and due, plus expired leases) per job type.",
    [JOB_TYPE_LABEL],
    registry=QUEUE_DEPTH_REGISTRY,
)
_PUSH_LOCK: Final = threading.Lock()

# -- served by workers on /metrics ---------------------------------------------------------------
#: The queue depth as a worker sees it, for its own /metrics. Scraped under the workers' job
#: label, so the adapter rule and alerts (which select the pushed series, job="miroir_pipeline")
#: never count it twice.
WORKER_QUEUE_DEPTH: Final = Gauge(
    QUEUE_DEPTH_METRIC,
    "Claimable background chunks per job type, as last seen by this worker.",
    [JOB_TYPE_LABEL],
)
DUMP_IMPORT_BYTES_READ: Final = Counter(
    "miroir_dump_import_bytes_read_total",
    "Dump bytes read and committed by dump-import chunks.",
)
DUMP_IMPORT_DOCUMENTS_ROUTED: Final = Counter(
    "miroir_dump_import_documents_routed_total",
    "Documents routed to their shard and acknowledged by every target node during dump imports.",
)
RESHARD_DOCUMENTS_BACKFILLED: Final = Counter(
    "miroir_reshard_documents_backfilled_total",
    "Documents re-hashed, written to the shadow index and committed by reshard backfills.",
)


class CommittedCount:
    """Feeds a counter from a chunk's committed progress: by how far a progress figure moved
    past the highest value it had, so work a retry, a hand-back or a re-read does again is not
    counted twice, and work not yet acknowledged is not counted at all."""

    def __init__(self, counter: Counter, committed: int) -> None:
        self.counter = counter
        self.high = committed  # what earlier attempts of the chunk committed, and counted

    def commit(self, value: int) -> None:
        if value > self.high:
            self.counter.inc(value - self.high)
            self.high = value
CHUNK_CLAIMS: Final = Counter(
    "miroir_chunk_claims_total",
    "Chunk leases taken by this process (first claims and re-claims).",
    [JOB_TYPE_LABEL],
)
CHUNK_LEASE_LOSSES: Final = Counter(
    "miroir_chunk_lease_losses_total",
    "Chunks this process stopped because its lease was refused (taken over or expired).",
    [JOB_TYPE_LABEL],
)
CHUNK_RECLAIMS: Final = Counter(
    "miroir_chunk_reclaims_total",
    "Claims of a chunk an earlier attempt had started (resume after a crash, lost lease or retry).",
)
INVALID_DOCUMENTS: Final = Counter(
    "miroir_invalid_documents_total",
    "Invalid documents met (malformed line, bad primary key, bad UTF-8, over-long line).",
    [JOB_TYPE_LABEL, "policy"],
)
CHUNK_DURATION: Final = Histogram(
    "miroir_chunk_duration_seconds",
    "Wall time of one chunk attempt, by how it ended.",
    [JOB_TYPE_LABEL, "outcome"],
    buckets=_CHUNK_DURATION_BUCKETS,
)



def prime_job_type(job_type: str) -> None:
    """Export every label combination of ``job_type`` at zero, so rate() and alerts see a series
    before the first event instead of a gap (the job-kind registry calls it on registration)."""
    CHUNK_CLAIMS.labels(job_type=job_type)
    CHUNK_LEASE_LOSSES.labels(job_type=job_type)
    for policy in INVALID_DOCUMENT_POLICIES:
        INVALID_DOCUMENTS.labels(job_type=job_type, policy=policy)
    for outcome in CHUNK_OUTCOMES:
        CHUNK_DURATION.labels(job_type=job_type, outcome=outcome)


class MetricsPushError(RuntimeError):
    """Pushing to the Pushgateway failed; the message names the gateway and the cause."""


def _redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part, safe for error messages.

    Everything up to the last '@' is hidden, not just what a URL parser calls the user info:
    a raw '/' or '?' in a password would end the parser's netloc early and show the rest. A
    URL without a scheme is read as ``http://``, as the push reads it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    if "@" not in rest:
        return url
    return f"{scheme}://***@{rest[rest.rindex('@') + 1 :]}"


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's credentials hidden: the whole user info and the password (the
    user name alone is not a secret, and may be a short word found elsewhere in the text)."""
    rest = url.partition("://")[2] if "://" in url else url
    if "@" in rest:
        userinfo = rest[: rest.rindex("@")]
        password = userinfo.partition(":")[2]
        for secret in sorted({userinfo, password}, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
    return text


def push_queue_depth(
    gateway_url: str,
    depth: Mapping[str, int],
    *,
    job: str = PUSH_JOB,
    grouping_key: Mapping[str, str],
    timeout: float = DEFAULT_PUSH_TIMEOUT,
) -> None:
    """Replace the queue-depth group on the Pushgateway with ``depth``.

    Uses PUT, so the pushed group is exactly this gauge: a type that drained to zero is
    pushed as 0 (pass every registered type: ``store.queue_depth(job_types())`` does) rather
    than left at its old value, which would keep the HPA scaled up. Raises :class:`MetricsPushError` naming the
    gateway on any failure, and :class:`ValueError` for a negative depth or a grouping key
    that would clash with the ``job``/``job_type`` labels.
    """
    clashing = {"job", JOB_TYPE_LABEL} & set(grouping_key)
    if clashing:
        raise ValueError(
            f"grouping_key must not contain {sorted(clashing)}: 'job' is set by the job "
            f"argument and '{JOB_TYPE_LABEL}' is the per-series label of {QUEUE_DEPTH_METRIC}"
        )
    values: dict[str, int] = {}
    for job_type, count in depth.items():
        if count < 0:
            raise ValueError(
                f"queue depth of {job_type!r} is negative ({count}); depths count rows"
            )
        values[str(job_type)] = int(count)

    with _PUSH_LOCK:
        # Drop series of types pushed earlier but absent now, so the registry holds `values` only.
        QUEUE_DEPTH.clear()
        for job_type, count in values.items():
            QUEUE_DEPTH.labels(job_type=job_type).set(count)
        try:
            push_to_gateway(
                gateway_url,
                job=job,
                registry=QUEUE_DEPTH_REGISTRY,
                grouping_key=dict(grouping_key),
                timeout=timeout,
            )
        except urllib.error.HTTPError as exc:
            detail = exc.read(500).decode("utf-8", "replace").strip() if exc.fp else ""
            raise MetricsPushError(
                f"Pushgateway {_redact_url(gateway_url)} refused the queue-depth push: HTTP "
                f"{exc.code} {exc.reason}{': ' + detail if detail else ''}"
            ) from None
        except (http.client.InvalidURL, ValueError) as exc:
            # Not the parser's words: they quote the port or host, which may be password.
            raise MetricsPushError(
                f"the Pushgateway URL {_redact_url(gateway_url)} is not a valid http(s) URL "
                f"({type(exc).__name__}); check {PUSHGATEWAY_URL_ENV}: it is scheme://host:port, "
                "with any '/', '@' or ':' in a user name or password percent-encoded"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            reason = _scrub(" ".join(str(cause).split()), gateway_url)
            if isinstance(cause, http.client.HTTPException):  # the far end does not speak HTTP
                reason = f"not an HTTP answer ({type(cause).__name__}: {reason})"
            raise MetricsPushError(
                f"could not push {QUEUE_DEPTH_METRIC} to the Pushgateway at "
                f"{_redact_url(gateway_url)} (timeout {timeout:g}s): {reason}; check "
                f"{PUSHGATEWAY_URL_ENV} and that the gateway is running"
            ) from None  # the cause's own text may quote the URL's credentials


def push_queue_depth_from_env(
    depth: Mapping[str, int],
    environ: Mapping[str, str] | None = None,
    *,
    timeout: float = DEFAULT_PUSH_TIMEOUT,
) -> bool:
    """Push ``depth`` to ``$MIROIR_PUSHGATEWAY_URL`` grouped by ``deployment=$MIROIR_DEPLOYMENT``.

    Returns False (and pushes nothing) when no gateway is configured, True after a push.
    """
    env = os.environ if environ is None else environ
    url = env.get(PUSHGATEWAY_URL_ENV, "").strip()
    if not url:
        return False
    deployment = env.get(DEPLOYMENT_ENV, "").strip() or DEFAULT_DEPLOYMENT
    push_queue_depth(url, depth, grouping_key={DEPLOYMENT_LABEL: deployment}, timeout=timeout)
    return True


def start_metrics_server(port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve the default registry on ``http://addr:port/metrics`` from a daemon thread.

    Loopback by default; a Kubernetes pod passes ``0.0.0.0``. Returns the
    server: call ``shutdown()`` then ``server_close()`` to stop it. Port 0 picks a free port
    (read it from ``server.server_port``).
    """
    if port not in METRICS_PORTS:
        raise ValueError(f"cannot serve metrics on {addr}:{port}: a port is 0-65535")
    try:
        server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        raise OSError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; pick another port "
            f"with {METRICS_PORT_ENV}"
        ) from exc
    return server


def parse_port(text: str, name: str = METRICS_PORT_ENV) -> int:
    """``text`` as a port of :data:`METRICS_PORTS` (0-65535); else a ``ValueError`` naming
    ``name`` (where the text came from), the text and the range."""
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a port number (0-65535)") from None
    if port not in METRICS_PORTS:
        raise ValueError(f"{name}={text!r} is outside 0-65535")
    return port


def start_metrics_server_from_env(environ: Mapping[str, str] | None = None) -> WSGIServer | None:
    """Start the metrics server when ``$MIROIR_METRICS_PORT`` is set (bind ``$MIROIR_METRICS_ADDR``,
    default loopback); return None when it is unset or empty."""
    env = os.environ if environ is None else environ
    raw = env.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    port = parse_port(raw, METRICS_PORT_ENV)
    addr = env.get(METRICS_ADDR_ENV, "").strip() or "127.0.0.1"
    return start_metrics_server(port, addr)
