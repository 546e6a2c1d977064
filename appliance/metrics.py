"""Prometheus metrics: what the daemon did (counters, histograms) and what it holds now (gauges).

One registry per process (``METRICS``); the serving code records events through its methods, and
the gauges that describe live state (queue depth, running batch, KV cache and session memory,
audit availability) are read from the serving ``Server`` at scrape time, so they are never stale.
Exposed by the ``metrics`` op (role ``admin``) and, when ``[metrics] port`` is set, over HTTP on
localhost. Every metric is described in docs/OPERATIONS.md.
"""

from __future__ import annotations

import hmac
import logging
import socketserver
import threading
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)

if TYPE_CHECKING:
    from appliance.audit import Entry
    from appliance.transport.server import Server

log = logging.getLogger("appliance.metrics")

PREFIX = "edge_appliance"
disable_created_metrics()  # no *_created series: half the scrape, and restarts show as counter resets anyway
# Seconds: from a cache hit (~1 ms) to a long generation on a slow CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by op and status (ok, error, rejected)",
            ["op", "status"],
            registry=r,
        )
        self.errors = Counter(f"{PREFIX}_request_errors", "Requests not served, by error code", ["code"], registry=r)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Arrival to final reply of a generate request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Arrival to admission into the running batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            f"{PREFIX}_decode_tokens_per_second",
            "Per-request decode rate after the first token",
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of generate requests", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated", registry=r)
        self.audit_commit = Histogram(
            f"{PREFIX}_audit_commit_seconds",
            "One durable audit commit (a batch of rows)",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.audit_failures = Counter(f"{PREFIX}_audit_commit_failures", "Audit commits that failed", registry=r)
        self.model_info = Gauge(
            f"{PREFIX}_model_info", "The served model (value 1)", ["model_id", "version"], registry=r
        )
        self.model_version = Gauge(f"{PREFIX}_model_version", "Version of the served model", registry=r)
        self.model_load = Gauge(
            f"{PREFIX}_model_load_seconds", "Verify, decrypt and build time of the served model", registry=r
        )
        self.reloads = Counter(f"{PREFIX}_reloads", "Reloads, by result (ok, failed)", ["result"], registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge(f"{PREFIX}_running_batch_size", "Sequences in the running batch", registry=r)
        self.queue_capacity = Gauge(f"{PREFIX}_queue_capacity", "Waiting requests accepted before 'busy'", registry=r)
        self.kv_cache = Gauge(f"{PREFIX}_kv_cache_bytes", "KV cache memory the engine holds", registry=r)
        self.session_bytes = Gauge(f"{PREFIX}_session_cache_bytes", "KV cache kept for conversations", registry=r)
        self.sessions = Gauge(f"{PREFIX}_sessions", "Conversations kept", registry=r)
        self.audit_up = Gauge(
            f"{PREFIX}_audit_available", "1 while the audit store writes, 0 while requests are refused", registry=r
        )

        self.constraint_compile = Histogram(
            f"{PREFIX}_constraint_compile_seconds",
            "Building a request's output constraint at admission (grammar cached by digest), by kind",
            ["kind"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.constraint_mask = Histogram(
            f"{PREFIX}_constraint_mask_seconds",
            "Computing and applying one constrained row's token mask",
            buckets=(0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05),
            registry=r,
        )

        self.drafted = Counter(
            f"{PREFIX}_speculative_drafted_tokens", "Tokens drafted for speculative decoding, by drafter", ["drafter"],
            registry=r,
        )  # fmt: skip
        self.accepted = Counter(
            f"{PREFIX}_speculative_accepted_tokens",
            "Drafted tokens the model accepted (acceptance rate: accepted / drafted), by drafter",
            ["drafter"],
            registry=r,
        )
        self.acceptance = Histogram(
            f"{PREFIX}_speculative_acceptance_ratio",
            "Per-request share of drafted tokens accepted (requests that drafted)",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )

    # -- events ---------------------------------------------------------------------------------
    def request(self, op: str, status: str, code: str | None = None) -> None:
        self.requests.labels(op, status).inc()
        if code:
            self.errors.labels(code).inc()

    def generated(self, entry: Entry) -> None:
        """A generate request ended (its audit entry carries every timing, in seconds)."""
        self.request(entry.op, entry.status, entry.error_code)
        self.prompt_tokens.inc(entry.prompt_tokens)
        self.completion_tokens.inc(entry.completion_tokens)
        if entry.total_s is not None:
            self.latency.observe(entry.total_s)
        if entry.queue_s is not None:
            self.queue_wait.observe(entry.queue_s)
        if entry.ttft_s is not None:
            self.ttft.observe(entry.ttft_s)
            if entry.completion_tokens > 1 and entry.total_s > entry.ttft_s:
                self.tokens_per_s.observe((entry.completion_tokens - 1) / (entry.total_s - entry.ttft_s))

    def speculated(self, drafter: str, drafted: int, accepted: int) -> None:
        """A request that drafted ended."""
        self.drafted.labels(drafter).inc(drafted)
        self.accepted.labels(drafter).inc(accepted)
        self.acceptance.observe(accepted / drafted)

    def constraint_compiled(self, kind: str, seconds: float) -> None:
        self.constraint_compile.labels(kind).observe(seconds)

    def constraint_masked(self, seconds: float) -> None:
        self.constraint_mask.observe(seconds)

    def model_loaded(self, model_id: str, version: int, seconds: float) -> None:
        self.model_info.clear()
        self.model_info.labels(model_id, str(version)).set(1)
        self.model_version.set(version)
        self.model_load.set(seconds)

    # -- live state -----------------------------------------------------------------------------
    def watch(self, server: Server) -> None:
        """Read live gauges from ``server`` at every scrape (``server.runner`` changes on reload)."""
        self.queue_depth.set_function(lambda: server.runner.load()["waiting"])
        self.running.set_function(lambda: server.runner.load()["running"])
        self.queue_capacity.set(server.config.engine.max_queued)
        self.kv_cache.set_function(lambda: server.model.engine.cache_bytes())
        self.session_bytes.set_function(lambda: server.sessions.stats()["session_bytes"])
        self.sessions.set_function(lambda: server.sessions.stats()["sessions"])
        self.audit_up.set_function(lambda: 1 if server.writer.healthy else 0)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, port: int, addr: str = "127.0.0.1", token: str | None = None) -> ScrapeServer:
        """prometheus-client's WSGI app behind a bounded server: at most ``ScrapeServer.max_connections`` at once
        (more are closed at once), each given ``timeout_s`` in all, and with ``token`` a bearer credential."""
        server = ScrapeServer((addr, port), _Quiet)
        server.set_app(_with_token(make_wsgi_app(self.registry), token))
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics%s", addr, port, " (bearer token)" if token else "")
        return server


class ScrapeServer(socketserver.ThreadingMixIn, WSGIServer):
    """A thread per scrape, never more than ``max_connections`` (an idle connection was a thread with no timeout:
    307 of them took the daemon past its unit's TasksMax)."""

    daemon_threads = True
    max_connections = 8
    timeout_s = 5.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self.refused = 0

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        request.settimeout(self.timeout_s)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def _with_token(app, token: str | None):
    if not token:
        return app
    expected = f"Bearer {token}".encode()

    def guarded(environ, start_response):
        presented = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(presented, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"send Authorization: Bearer <the [metrics] token_file's token>\n"]
        return app(environ, start_response)

    return guarded


METRICS = Metrics()
