"""Metric names, labels and the two entry points (push, serve) of miroir_pipeline.metrics."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from miroir_pipeline import metrics
from miroir_pipeline.jobs.registry import job_types
from miroir_pipeline.metrics import (
    METRICS_ADDR_ENV,
    METRICS_PORT_ENV,
    MetricsPushError,
    push_queue_depth,
    push_queue_depth_from_env,
    start_metrics_server,
    start_metrics_server_from_env,
)

JOB_TYPES = set(job_types())
PUSHES = 60


def _families(text: str) -> dict[str, tuple[str, list[tuple[str, dict[str, str], float]]]]:
    return {
        f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
    }


def test_worker_metrics_have_design_names_types_and_labels() -> None:
    fams = _families(generate_latest(REGISTRY).decode())

    for counter in (
        "miroir_dump_import_bytes_read",
        "miroir_dump_import_documents_routed",
        "miroir_reshard_documents_backfilled",
        "miroir_chunk_reclaims",
    ):
        kind, samples = fams[counter]
        assert kind == "counter"
        assert f"{counter}_total" in {name for name, _, _ in samples}

    for counter in ("miroir_chunk_claims", "miroir_chunk_lease_losses"):
        kind, samples = fams[counter]
        assert kind == "counter"
        # Every job type exported (at zero) before the first event.
        assert {lab["job_type"] for name, lab, _ in samples if name.endswith("_total")} == JOB_TYPES

    kind, samples = fams["miroir_invalid_documents"]
    assert kind == "counter"
    assert {(lab["job_type"], lab["policy"]) for n, lab, _ in samples if n.endswith("_total")} == {
        (t, p) for t in JOB_TYPES for p in ("fail", "skip")
    }

    kind, samples = fams["miroir_chunk_duration_seconds"]
    assert kind == "histogram"
    assert {(lab["job_type"], lab["outcome"]) for n, lab, _ in samples if n.endswith("_count")} == {
        (t, o) for t in JOB_TYPES for o in metrics.CHUNK_OUTCOMES
    }


def test_pushed_queue_depth_is_kept_apart_from_what_workers_serve() -> None:
    """The push carries only the queue depth (from its own registry); workers serve their own
    copy, which the HPA never sums twice because the adapter selects job="miroir_pipeline"."""
    assert metrics.QUEUE_DEPTH_METRIC == "miroir_background_queue_depth"
    assert metrics.JOB_TYPE_LABEL == "job_type"
    pushed = _families(generate_latest(metrics.QUEUE_DEPTH_REGISTRY).decode())
    assert set(pushed) == {metrics.QUEUE_DEPTH_METRIC} and pushed[metrics.QUEUE_DEPTH_METRIC][0] == "gauge"
    served = _families(generate_latest(REGISTRY).decode())
    assert served[metrics.QUEUE_DEPTH_METRIC][0] == "gauge"
    rule = (Path(__file__).resolve().parents[2] / "k8s" / "prometheus-adapter-rules.yaml").read_text()
    assert 'miroir_background_queue_depth{job="miroir_pipeline"' in rule


@pytest.fixture
def server() -> Iterator[WSGIServer]:
    srv = start_metrics_server(0)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_metrics_server_serves_counters_on_loopback(server: WSGIServer) -> None:
    assert server.server_address[0] == "127.0.0.1"
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    def routed() -> float:
        fams = _families(httpx.get(url, timeout=5).text)
        return fams["miroir_dump_import_documents_routed"][1][0][2]

    before = routed()
    metrics.DUMP_IMPORT_DOCUMENTS_ROUTED.inc(5)
    assert routed() == before + 5


def test_metrics_server_port_in_use_names_the_address(server: WSGIServer) -> None:
    with pytest.raises(OSError, match=rf"127\.0\.0\.1:{server.server_port}.*{METRICS_PORT_ENV}"):
        start_metrics_server(server.server_port)


def test_metrics_server_from_env() -> None:
    assert start_metrics_server_from_env({}) is None
    with pytest.raises(ValueError, match=METRICS_PORT_ENV):
        start_metrics_server_from_env({METRICS_PORT_ENV: "metrics"})
    with pytest.raises(ValueError, match="outside"):
        start_metrics_server_from_env({METRICS_PORT_ENV: "70000"})
    srv = start_metrics_server_from_env({METRICS_PORT_ENV: "0", METRICS_ADDR_ENV: ""})
    assert srv is not None
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert (
            httpx.get(f"http://127.0.0.1:{srv.server_port}/metrics", timeout=5).status_code == 200
        )
    finally:
        srv.shutdown()
        srv.server_close()


def test_push_refuses_bad_input_before_any_network() -> None:
    with pytest.raises(ValueError, match="negative"):
        push_queue_depth("http://127.0.0.1:9", {"dump_import": -1}, grouping_key={})
    with pytest.raises(ValueError, match="job_type"):
        push_queue_depth("http://127.0.0.1:9", {}, grouping_key={"job_type": "x"})
    with pytest.raises(ValueError, match="'job'"):
        push_queue_depth("http://127.0.0.1:9", {}, grouping_key={"job": "x"})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_push_to_nothing_names_gateway_and_hides_credentials() -> None:
    port = _closed_port()
    with pytest.raises(MetricsPushError, match=rf"127\.0\.0\.1:{port}") as err:
        push_queue_depth(f"http://127.0.0.1:{port}", {}, grouping_key={"deployment": "d"})
    assert "MIROIR_PUSHGATEWAY_URL" in str(err.value)

    with pytest.raises(MetricsPushError) as err:
        push_queue_depth(
            f"http://ops:hunter2@127.0.0.1:{port}", {}, grouping_key={"deployment": "d"}
        )
    assert "hunter2" not in str(err.value)
    assert "ops" not in str(err.value)


@pytest.mark.parametrize(
    "userinfo", ["ops:pQ/ss-Secret9", "ops:pQ?ss-Secret9", "ops:pQ@ss-Secret9", "ops:Secret9x"]
)
def test_credentials_a_url_parser_would_misread_never_reach_the_error(userinfo: str) -> None:
    """A raw '/', '?' or '@' in the password ends a URL parser's host part early; a password
    standing where the port goes makes http.client quote it as a bad port. Either way the
    push fails with MetricsPushError (the sensor reports it and carries on) and no part of
    the credentials, in its text or its chained causes."""
    port = _closed_port()
    for url in (f"http://{userinfo}@127.0.0.1:{port}", f"{userinfo}@127.0.0.1:{port}"):  # no scheme: http
        with pytest.raises(MetricsPushError) as err:
            push_queue_depth(url, {"dump_import": 1}, grouping_key={"deployment": "d"}, timeout=2)
        shown = "".join(traceback.format_exception(err.value))  # what a log or the UI shows
        assert "Secret9" not in shown and "pQ" not in shown, shown
        assert f"http://***@127.0.0.1:{port}" in str(err.value)
        assert "MIROIR_PUSHGATEWAY_URL" in str(err.value)


def test_a_gateway_that_does_not_speak_http_is_a_push_error() -> None:
    """A listener that answers with something other than HTTP (a real socket)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer_garbage() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

        server = threading.Thread(target=answer_garbage, daemon=True)
        server.start()
        with pytest.raises(MetricsPushError, match=r"not an HTTP answer \(BadStatusLine"):
            push_queue_depth(f"http://127.0.0.1:{port}", {}, grouping_key={"deployment": "d"}, timeout=5)
        server.join(10)


def test_push_times_out_on_a_silent_gateway() -> None:
    """A listener that accepts and never answers (a real socket, the fault we need)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(MetricsPushError, match=r"timeout 0\.5s"):
            push_queue_depth(
                f"http://127.0.0.1:{port}", {}, grouping_key={"deployment": "d"}, timeout=0.5
            )
        assert time.monotonic() - started < 5


def test_push_from_env_without_url_pushes_nothing() -> None:
    assert push_queue_depth_from_env({"dump_import": 3}, {}) is False
    assert push_queue_depth_from_env({"dump_import": 3}, {"MIROIR_PUSHGATEWAY_URL": "  "}) is False


def test_concurrent_pushes_never_mix_values() -> None:
    """The shared gauge is filled and pushed under a lock: each push sends its own values."""

    bodies: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            bodies.append(self.rfile.read(length).decode())
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    # A minimal real HTTP receiver stands in for the gateway only to record request bodies.
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}"
        workers = [
            threading.Thread(
                target=push_queue_depth,
                args=(url, {"dump_import": n, "reshard_backfill": n}),
                kwargs={"grouping_key": {"deployment": "d"}},
            )
            for n in range(PUSHES)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(10)
    finally:
        httpd.shutdown()
        httpd.server_close()

    assert len(bodies) == PUSHES
    pushed = []
    for body in bodies:
        values = {
            s.labels["job_type"]: s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        assert values["dump_import"] == values["reshard_backfill"]
        pushed.append(int(values["dump_import"]))
    assert sorted(pushed) == list(range(PUSHES))
