"""Prometheus metrics from a live daemon: a scrape parsed with prometheus-client's parser matches the traffic sent."""

from __future__ import annotations

import urllib.request

import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from appliance.transport.client import Client, ClientError
from tests.conftest import Daemon, free_port, provision_device


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    for s in families[family]:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample_name}{labels} in {families[family]}")


@pytest.fixture(scope="module")
def served(tiny_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    device = provision_device(tiny_build, root / "site")
    port = free_port()
    device.config.write_text(device.config.read_text().replace("port = 0 ", f"port = {port} "))
    daemon = Daemon(device, root / "daemon")
    daemon.wait_for("READY=1")
    yield device, port
    daemon.stop()


def test_scrape_matches_the_requests_sent(served):
    device, port = served
    before = scrape(port)
    assert value(before, "edge_appliance_model_version") == 1
    assert value(before, "edge_appliance_model_info", model_id="tiny", version="1") == 1
    assert value(before, "edge_appliance_model_load_seconds") > 0
    assert value(before, "edge_appliance_audit_available") == 1
    usage = []
    with Client(device.endpoint) as client:
        for i in range(3):
            final = client.complete(f"Return the {i}", max_tokens=5, ignore_eos=True)
            usage.append(final["usage"])
        client.health()
        with pytest.raises(ClientError) as too_large:
            client.complete("Return the value " * 400, max_tokens=5)
        assert too_large.value.code == "too_large"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(device.endpoint)
    sock.send(msgpack.packb({"v": 1, "op": "generate", "id": "x", "prompt": 7}))  # wrong type: rejected
    assert msgpack.unpackb(sock.recv())["code"] == "bad_request"
    sock.close(linger=0)
    after = scrape(port)
    assert value(after, "edge_appliance_requests_total", op="generate", status="ok") == 3
    assert value(after, "edge_appliance_requests_total", op="health", status="ok") == 1
    # too_large, and the wrong-typed prompt (its op is known once the map is read)
    assert value(after, "edge_appliance_requests_total", op="generate", status="rejected") == 2
    assert value(after, "edge_appliance_request_errors_total", code="bad_request") == 1
    assert value(after, "edge_appliance_request_errors_total", code="too_large") == 1
    assert value(after, "edge_appliance_completion_tokens_total") == sum(u["completion_tokens"] for u in usage) == 15
    assert value(after, "edge_appliance_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    for hist in ("time_to_first_token_seconds", "request_duration_seconds", "queue_wait_seconds"):
        assert value(after, f"edge_appliance_{hist}_count") == 3, hist
        assert value(after, f"edge_appliance_{hist}_bucket", le="+Inf") == 3, hist
    assert value(after, "edge_appliance_decode_tokens_per_second_count") == 3
    assert value(after, "edge_appliance_audit_commit_seconds_count") >= 1  # group commit: batches, not rows
    assert value(after, "edge_appliance_audit_commit_failures_total") == 0
    assert value(after, "edge_appliance_queue_depth") == 0 and value(after, "edge_appliance_running_batch_size") == 0
    assert value(after, "edge_appliance_kv_cache_bytes") > 0  # the decode arenas were allocated
    assert value(after, "edge_appliance_queue_capacity") == 64


def test_metrics_op_is_refused_without_the_admin_role(served):
    device, _ = served
    with Client(device.endpoint) as client, pytest.raises(ClientError) as refused:
        client.call("metrics")
    assert refused.value.code == "forbidden"


def test_the_scrape_port_takes_a_token_and_idle_connections_cost_no_threads(tiny_build, tmp_path):
    """With [metrics] token_file a scrape without the bearer token gets 401; 120 idle connections (no bytes) leave
    the daemon's thread count where it was (each was a thread with no timeout: 307 took it past TasksMax), and a
    scrape works again once they time out."""
    import os
    import socket
    import time
    import urllib.error

    device = provision_device(tiny_build, tmp_path / "site")
    port = free_port()
    (device.config.parent / "metrics.token").write_text("s3cret-scrape-token-0123\n")
    text = device.config.read_text().replace("port = 0 ", f'token_file = "metrics.token"\nport = {port} ')
    device.config.write_text(text)
    daemon = Daemon(device, tmp_path / "daemon")
    try:
        daemon.wait_for("READY=1")
        url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        auth = {"Authorization": "Bearer s3cret-scrape-token-0123"}
        assert (
            b"edge_appliance_model_version"
            in urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=10).read()
        )
        threads = len(os.listdir(f"/proc/{daemon.proc.pid}/task"))
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(120)]

        def closed_by_server(s: socket.socket) -> bool:
            s.settimeout(0.05)
            try:
                return s.recv(1, socket.MSG_PEEK) == b""
            except (TimeoutError, BlockingIOError):
                return False
            except ConnectionError:
                return True

        deadline = time.monotonic() + 10
        while sum(closed_by_server(s) for s in idle) < 120 - 8:  # all accepted: past the cap, closed at once
            assert time.monotonic() < deadline, "the server never turned the surplus connections away"
        assert len(os.listdir(f"/proc/{daemon.proc.pid}/task")) <= threads + 8
        deadline = time.monotonic() + 20
        while True:  # the held connections time out after 5 s; then a scrape gets through
            try:
                urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the scrape port never recovered"
                time.sleep(0.5)
        for s in idle:
            s.close()
    finally:
        daemon.stop()


def test_speculative_decoding_is_reported_in_the_reply_the_scrape_and_the_audit_row(served):
    """The default ``speculative = "auto"`` drafts by n-gram on this bundle (no draft model): a repetitive answer's
    drafted and accepted tokens appear in its ``done`` reply, in the Prometheus counters, and its audit row names
    the drafter; a request that opts out is not counted."""
    from appliance.audit.store import AuditLog
    from appliance.config import load_config

    device, port = served

    def counted(families: dict, name: str) -> float:
        try:
            return value(families, f"edge_appliance_speculative_{name}_tokens_total", drafter="ngram")
        except (AssertionError, KeyError):
            return 0.0

    before = scrape(port)
    with Client(device.endpoint) as client:
        assert client.info()["speculative"] == "ngram" and "speculative" in client.info()["features"]
        done = client.complete("Return the", max_tokens=48, ignore_eos=True, request_id="spec-1")
        # one token fewer: not the response cache's copy of the first answer
        plain = client.complete("Return the", max_tokens=47, ignore_eos=True, speculative=False, request_id="spec-0")
    spec = done["speculative"]
    assert spec["drafter"] == "ngram" and spec["drafted"] >= spec["accepted"] > 0, spec
    assert "speculative" not in plain and not plain["cache_hit"] and done["text"].startswith(plain["text"])
    after = scrape(port)
    assert counted(after, "drafted") - counted(before, "drafted") == spec["drafted"]
    assert counted(after, "accepted") - counted(before, "accepted") == spec["accepted"]
    rows = {r.request_id: r for r in AuditLog(load_config(device.config).audit_db).rows()}
    assert rows["spec-1"].speculative == "ngram" and rows["spec-0"].speculative is None
