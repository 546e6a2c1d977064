"""Audit overhead: the daemon with its SQLite audit store vs with no store at all, same run.

Short requests (1 new token) make the per-request cost of the audit row visible; 8 concurrent
clients show sustained audited requests/s (the per-step group commit at work). Writes
bench/results/audit_overhead.json.

    .venv/bin/python bench/audit_overhead.py --config .demo/appliance.toml
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.transport.client import Client  # noqa: E402
from bench.common import daemon  # noqa: E402


def sequential(endpoint: str, n: int) -> dict:
    lat = []
    with Client(endpoint, timeout_s=60) as c:
        for i in range(n):
            t = time.perf_counter()
            c.complete(f"Return the {i}", max_tokens=1)
            lat.append((time.perf_counter() - t) * 1000)
    return {
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests_per_s": n / (sum(lat) / 1000),
    }


def concurrent(endpoint: str, clients: int, seconds: float) -> dict:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(k: int) -> None:
        with Client(endpoint, timeout_s=60) as c:
            while time.monotonic() < stop:
                c.complete("Return the", max_tokens=1)
                done[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "requests_per_s": sum(done) / (time.perf_counter() - t0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="daemon config of a provisioned device (e.g. .demo/appliance.toml)")
    p.add_argument("--requests", type=int, default=300, help="sequential requests per arm (default: 300)")
    p.add_argument("--seconds", type=float, default=10, help="duration of the 8-client run per arm (default: 10)")
    p.add_argument("--out", default="bench/results/audit_overhead.json", help="results file")
    args = p.parse_args()
    config = Path(args.config)
    arms = {}
    for name, store in (("no_store", "none"), ("sqlite_audit", None)):
        with daemon(config, name, audit_store=store) as endpoint:
            sequential(endpoint, 20)  # warm-up
            arms[name] = {
                "sequential": sequential(endpoint, args.requests),
                "concurrent_8": concurrent(endpoint, 8, args.seconds),
            }
            with Client(endpoint) as c:
                health = c.health()
            arms[name]["rows_per_commit"] = health["audit_rows"] / max(1, health["audit_commits"])
    a, b = arms["sqlite_audit"], arms["no_store"]
    result = {
        **arms,
        "per_request_overhead_ms_p50": a["sequential"]["p50_ms"] - b["sequential"]["p50_ms"],
        "sequential_throughput_ratio": a["sequential"]["requests_per_s"] / b["sequential"]["requests_per_s"],
        "concurrent_throughput_ratio": a["concurrent_8"]["requests_per_s"] / b["concurrent_8"]["requests_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, arm in arms.items():
        seq, conc = arm["sequential"], arm["concurrent_8"]
        print(
            f"{name:13} sequential p50 {seq['p50_ms']:6.2f} ms  p99 {seq['p99_ms']:6.2f} ms  "
            f"{seq['requests_per_s']:6.1f} req/s | 8 clients {conc['requests_per_s']:6.1f} req/s"
        )
    print(
        f"audit cost per request (p50): {result['per_request_overhead_ms_p50']:.2f} ms; throughput ratio "
        f"sequential {result['sequential_throughput_ratio']:.2f}, "
        f"8 clients {result['concurrent_throughput_ratio']:.2f}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
