"""Added latency of the HTTP gateway: time to first token over HTTP (SSE) vs over ZeroMQ, same daemon.

One daemon (CURVE on, audit on, response cache off) and one `edge-appliance http` gateway are
started from a copy of the device's config. Each round runs the same load over ZeroMQ (the
project's Python client, CURVE) and over HTTP (a thin `http.client` SSE reader, so the number is
the bridge's cost, not a client library's), alternating which goes first, at each concurrency
level. Time to first token is measured on the client, from sending the request to the first text.

With ``--before REV`` a second gateway runs the gateway code of git revision REV (a worktree on
its own port, the same daemon, the same keys) and takes its turn in every round: the gateway's
added latency before and after a change, measured side by side in one run.

    .venv/bin/python bench/http_bridge.py --config .demo/appliance.toml
    .venv/bin/python bench/http_bridge.py --config .demo/appliance.toml --before 58d1916
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.config import load_config  # noqa: E402
from appliance.transport import api_keys  # noqa: E402
from appliance.transport.auth import client_keygen, server_public_key  # noqa: E402
from appliance.transport.client import Client  # noqa: E402
from bench.common import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "How do I reset the conveyor?"


def site(config: Path, identity: Path, work: Path) -> tuple[Path, str, str, int]:
    """A copy of ``config`` with CURVE, a gateway and a client key, an API key and the [http] section."""
    shutil.rmtree(work, ignore_errors=True)  # this run's keys only
    work.mkdir(parents=True)
    gateway = client_keygen(work / "gateway", "bench-gateway", "gateway")
    client = client_keygen(work / "client", "bench-client", "infer")
    (work / "clients.toml").write_text(
        "".join(f'[[client]]\nname = "{e.name}"\nkey = "{e.key}"\nrole = "{e.role}"\n' for e in (gateway, client))
    )
    key, entry = api_keys.mint("bench-http")
    (work / "http-keys.toml").write_text(api_keys.entry_toml(entry))
    endpoint, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    cfg = load_config(config)
    text = config.read_text().replace(cfg.server.endpoints[0], endpoint)
    text = re.sub(r"(?m)^response_cache\s*=.*$", "response_cache = 0", text)  # repeated requests must run
    # 8 ZeroMQ clients with one key: more connections than the per-key default of 4
    text = re.sub(r"(?m)^max_connections_per_client\s*=.*$", "max_connections_per_client = 16", text)
    text = text.replace("curve = false", f'curve = true\nclients = "{work}/clients.toml"')
    text = re.sub(
        r'(?m)^listen = ".*"$',
        f'listen = "127.0.0.1:{port}"\nkeys = "{work}/http-keys.toml"\n'
        f'client_key = "{work}/gateway/client.key"\nserver_key = "{identity}"',
        text,
    )
    out = config.with_name("bench-http-appliance.toml")
    out.write_text(text)
    return out, endpoint, key, port


def zmq_requests(endpoint: str, curve: dict, new: int, n: int, out: list[float]) -> None:
    """``n`` streamed requests on one ZeroMQ connection; appends each one's time to first token."""
    with Client(endpoint, timeout_s=600, **curve) as c:
        for _ in range(n):
            t0, first = time.perf_counter(), None
            for _event in c.generate(PROMPT, max_tokens=new, ignore_eos=True):
                first = first or time.perf_counter()
            out.append(first - t0)


def http_requests(port: int, key: str, model: str, new: int, n: int, out: list[float]) -> None:
    """``n`` streamed completions on one keep-alive HTTP connection; appends each one's time to first token."""
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": new, "stream": True, "ignore_eos": True})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        for _ in range(n):
            t0, first = time.perf_counter(), None
            conn.request("POST", "/v1/completions", body, headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
            for line in resp:
                if first is None and line.startswith(b"data: "):
                    first = time.perf_counter()
            out.append(first - t0)
    finally:
        conn.close()


def openai_transcript(port: int, key: str, model: str) -> dict:
    """One streamed chat completion with the official client, kept verbatim for the record."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    request = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 32,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = list(client.chat.completions.create(**request))
    return {
        "client": "openai.OpenAI(base_url=..., api_key=...).chat.completions.create(**request)",
        "request": request,
        "chunks": len(chunks),
        "first_chunk": chunks[0].model_dump(exclude_none=True),
        "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "finish_reason": next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason),
        "usage": chunks[-1].usage.model_dump(),
    }


def load(worker, clients: int, per_client: int, *args) -> list[float]:
    ttfts: list[float] = []
    threads = [threading.Thread(target=worker, args=(*args, per_client, ttfts)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(ttfts) != clients * per_client:
        raise RuntimeError(f"{worker.__name__}: {len(ttfts)} of {clients * per_client} requests completed")
    return ttfts


def summary(ttfts: list[float]) -> dict:
    ms = np.array(ttfts) * 1000
    return {
        "requests": len(ttfts),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
    }


def baseline(rev: str, work: Path) -> Path:
    """A worktree of the project at ``rev`` (its ``appliance`` package is the gateway measured as "before")."""
    tree = work.parent / f"{work.name}-before-{rev}"  # beside the work dir, which each run empties
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
    return tree


def start_gateway(exe: Path, config: Path, log, tree: Path | None = None) -> subprocess.Popen:
    if tree is None:
        return subprocess.Popen([str(exe), "--config", str(config), "http"], stdout=log, stderr=log)
    env = {**os.environ, "PYTHONPATH": str(tree)}  # that revision's package ahead of the installed one
    code = "import sys; from appliance.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "--config", str(config), "http"]
    return subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=tree)


def gateway_health(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("GET", "/health")
    if conn.getresponse().status != 200:
        raise RuntimeError("gateway not ready")


def wait_ready(proc: subprocess.Popen, what: str, check) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            check()
            return
        except Exception:  # not up yet: the daemon is loading, the gateway is connecting
            time.sleep(0.2)
    raise RuntimeError(f"{what} not ready in 300 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=".demo/appliance.toml", help="device config (default: the demo's)")
    p.add_argument("--identity", default=".demo/device-identity.json", help="the device identity (CURVE public key)")
    p.add_argument("--work", default="build/bench-http", help="keys and allow-lists for this run")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrency levels (default: 1 8)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per level (default: 4)")
    p.add_argument("--per-round", type=int, default=10, help="requests per transport per round (default: 10)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default: 16)")
    p.add_argument("--before", metavar="REV", help="also run the gateway of git revision REV, side by side")
    p.add_argument("--out", default="bench/results/http_bridge.json", help="results file")
    args = p.parse_args()

    work = (ROOT / args.work).resolve()
    config, endpoint, key, port = site((ROOT / args.config).resolve(), (ROOT / args.identity).resolve(), work)
    exe = Path(sys.executable).parent / "edge-appliance"
    secret = (work / "client" / "client.key").read_bytes()
    server_key = server_public_key(str((ROOT / args.identity).resolve()))
    curve = {"curve_server_key": server_key, "curve_keypair": (zmq.curve_public(secret), secret)}
    logs = [open(work / f"{name}.log", "w") for name in ("daemon", "gateway", "gateway-before")]  # noqa: SIM115
    daemon = subprocess.Popen([str(exe), "--config", str(config), "serve"], stdout=logs[0], stderr=logs[0])
    gateways: list[subprocess.Popen] = []
    before_config = config.with_name("bench-http-before.toml")
    try:
        with Client(endpoint, timeout_s=2, retries=1, **curve) as probe:
            wait_ready(daemon, "daemon", probe.health)
            info = probe.info()
        gateways.append(start_gateway(exe, config, logs[1]))
        wait_ready(gateways[0], "gateway", lambda: gateway_health(port))
        model = info["model_id"]
        runs = {
            "zeromq": (zmq_requests, endpoint, curve),
            "http": (http_requests, port, key, model),
        }
        if args.before:
            before_port = free_port()
            before_config.write_text(config.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{before_port}"))
            gateways.append(start_gateway(exe, before_config, logs[2], baseline(args.before, work)))
            wait_ready(gateways[1], f"gateway at {args.before}", lambda: gateway_health(before_port))
            runs["http_before"] = (http_requests, before_port, key, model)
        for worker, *fixed in runs.values():  # warm-ups
            load(worker, 1, 2, *fixed, args.new_tokens)
        transcript = openai_transcript(port, key, model)
        levels = {}
        names = list(runs)
        for clients in args.clients:
            per_client = max(1, args.per_round // clients)
            samples: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:  # each goes first in turn
                    worker, *fixed = runs[name]
                    samples[name] += load(worker, clients, per_client, *fixed, args.new_tokens)
                print(f"{clients} client(s), round {r + 1}/{args.rounds}", flush=True)
            level = {name: summary(samples[name]) for name in names}
            z = level["zeromq"]
            for name in names[1:]:
                level[f"added_ms{name.removeprefix('http')}"] = {
                    k: round(level[name][k] - z[k], 2) for k in ("p50_ms", "p99_ms", "mean_ms")
                }
            levels[str(clients)] = level
    finally:
        for proc in (*gateways, daemon):
            proc.terminate()
            proc.wait(timeout=30)
        for f in logs:
            f.close()
        config.unlink()
        before_config.unlink(missing_ok=True)
    result = {
        "what": "time to first token, client-measured: HTTP gateway (SSE) vs ZeroMQ, same daemon, same run",
        "command": "python bench/http_bridge.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "shared machine (other jobs running); rounds alternate transports so load affects both alike",
        "model": model,
        "engine": info["engine"],
        "max_batch": info["limits"]["max_batch"],
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "curve": True,
        "audit": "on",
        "response_cache": 0,
        "before": args.before and {"revision": args.before, "gateway": "the gateway code of that revision"},
        "clients": levels,
        "openai_transcript": transcript,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for clients, level in levels.items():
        print(
            f"{clients:>2} client(s): TTFT p50 {level['zeromq']['p50_ms']:.1f} -> {level['http']['p50_ms']:.1f} ms, "
            f"p99 {level['zeromq']['p99_ms']:.1f} -> {level['http']['p99_ms']:.1f} ms "
            f"(added p50 {level['added_ms']['p50_ms']:+.1f} ms, p99 {level['added_ms']['p99_ms']:+.1f} ms)"
        )
        if "http_before" in level:
            b = level["added_ms_before"]
            print(f"    gateway at {args.before}: added p50 {b['p50_ms']:+.1f} ms, p99 {b['p99_ms']:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
