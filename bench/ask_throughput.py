"""Throughput of the installed model: in-process engine vs the daemon through ZeroMQ, same run.

Reports, gpt-fast style, batch-1 decode tokens/s, time to first token, latency percentiles, and
"bandwidth achieved" (weight bytes read per token × tokens/s) next to this machine's measured
memory-read bandwidth; plus aggregate tokens/s with several concurrent clients. Writes
bench/results/ask_throughput.json and prints a table.

    .venv/bin/python bench/ask_throughput.py --config .demo/appliance.toml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.client import Client  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.loader import load_model  # noqa: E402
from bench.common import daemon  # noqa: E402

PROMPTS = ["How do I reset the conveyor?", "Return the number of", "The socket module provides",
           "Raise ValueError if the"]


def memory_read_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large numpy sum (reads each byte once); best of ``repeats``."""
    a = np.ones(size_mb * (1 << 20) // 8, np.float64)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def in_process(config, new_tokens: int, rounds: int) -> dict:
    model = load_model(config)
    eng, spec = model.engine, model.spec
    ttft, rates = [], []
    for r in range(rounds):
        ids = [spec.bos_token_id, *model.tokenizer.encode(PROMPTS[r % len(PROMPTS)]).ids]
        t0 = time.perf_counter()
        logits = eng.prefill([(0, ids)])
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = eng.decode([(0, int(np.argmax(logits[0])))])
        t2 = time.perf_counter()
        eng.release(0)
        ttft.append((t1 - t0) * 1000)
        rates.append((new_tokens - 1) / (t2 - t1))
    return {"tokens_per_s": statistics.median(rates), "ttft_ms": statistics.median(ttft),
            "weight_bytes": spec.weight_bytes}


def through_daemon(endpoint: str, new_tokens: int, rounds: int) -> dict:
    rates, ttft, totals = [], [], []
    with Client(endpoint, timeout_s=120) as c:
        for r in range(rounds):
            final = c.complete(PROMPTS[r % len(PROMPTS)], max_tokens=new_tokens, ignore_eos=True)
            rates.append(final["timings"]["tokens_per_s"])
            ttft.append(final["timings"]["ttft_ms"])
            totals.append(final["timings"]["total_ms"])
    return {"tokens_per_s": statistics.median(rates), "ttft_ms": statistics.median(ttft),
            "total_ms_p50": float(np.percentile(totals, 50)), "total_ms_p90": float(np.percentile(totals, 90))}


def concurrent(endpoint: str, clients: int, per_client: int, new_tokens: int) -> dict:
    latencies, ttfts, tokens = [], [], [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        with Client(endpoint, timeout_s=300) as c:
            for r in range(per_client):
                final = c.complete(PROMPTS[(i + r) % len(PROMPTS)], max_tokens=new_tokens, ignore_eos=True)
                with lock:
                    latencies.append(final["timings"]["total_ms"])
                    ttfts.append(final["timings"]["ttft_ms"])
                    tokens[0] += final["usage"]["completion_tokens"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "aggregate_tokens_per_s": tokens[0] / wall,
            "latency_ms": {p: float(np.percentile(latencies, int(p[1:]))) for p in ("p50", "p90", "p99")},
            "ttft_ms": {p: float(np.percentile(ttfts, int(p[1:]))) for p in ("p50", "p90", "p99")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="daemon config of a provisioned device (e.g. .demo/appliance.toml)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default: 128)")
    p.add_argument("--rounds", type=int, default=5, help="repetitions for medians (default: 5)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrency levels (default: 1 4)")
    p.add_argument("--out", default="bench/results/ask_throughput.json", help="results file")
    args = p.parse_args()
    config_path = Path(args.config)
    config = load_config(config_path)
    bandwidth = memory_read_bandwidth()
    local = in_process(config, args.new_tokens, args.rounds)
    with daemon(config_path) as endpoint:
        remote = through_daemon(endpoint, args.new_tokens, args.rounds)
        loads = [concurrent(endpoint, n, 2, args.new_tokens) for n in args.clients]
    wb = local["weight_bytes"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "new_tokens": args.new_tokens, "rounds": args.rounds,
        "memory_read_bandwidth_GBps": bandwidth / 1e9,
        "in_process": {**local, "bandwidth_achieved_GBps": wb * local["tokens_per_s"] / 1e9},
        "daemon": {**remote, "bandwidth_achieved_GBps": wb * remote["tokens_per_s"] / 1e9},
        "daemon_vs_in_process": remote["tokens_per_s"] / local["tokens_per_s"],
        "concurrency": loads,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"memory read bandwidth      {bandwidth / 1e9:8.2f} GB/s   weights read per token {wb / 1e6:.2f} MB")
    print(f"{'path':20} {'tok/s':>8} {'TTFT ms':>8} {'GB/s achieved':>14}")
    for name, r in (("in-process engine", result["in_process"]), ("daemon over ZeroMQ", result["daemon"])):
        print(f"{name:20} {r['tokens_per_s']:8.1f} {r['ttft_ms']:8.1f} {r['bandwidth_achieved_GBps']:14.3f}")
    print(f"daemon / in-process tokens/s: {result['daemon_vs_in_process']:.3f}")
    for load in loads:
        lat = load["latency_ms"]
        print(f"{load['clients']:2d} clients: {load['aggregate_tokens_per_s']:8.1f} tok/s aggregate, "
              f"latency p50/p90/p99 {lat['p50']:.0f}/{lat['p90']:.0f}/{lat['p99']:.0f} ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
