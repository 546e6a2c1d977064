"""Soak test (not in CI): 16 clients mixing streams, cancels, sessions, disconnects and hostile
frames against one live daemon for a long time.

Reports, per interval: daemon RSS, requests answered, p50/p99 end-to-end latency; at the end:
RSS growth from the first interval to the last, and answered-vs-audited counts (every generate a
client saw finish must have exactly one audit row). Results in bench/results/soak.json.

    python bench/soak.py --config .demo/appliance.toml --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from appliance.audit import AuditLog  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.transport.client import Client, ClientError  # noqa: E402

PROMPTS = ["Return the", "How do I reset the conveyor?", "Raise ValueError if", "def parse("]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.finished_ids: set[str] = set()
        self.errors: dict[str, int] = {}

    def done(self, rid: str, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.finished_ids.add(rid)

    def error(self, code: str) -> None:
        with self.lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def take(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
            return out


def worker(n: int, endpoint: str, stop: threading.Event, stats: Stats, run: str) -> None:
    rng = random.Random(n)
    i = 0
    while not stop.is_set():
        i += 1
        rid = f"{run}-{n}-{i}"  # unique per run, so the audit check never matches an earlier run's rows
        kind = rng.choice(("stream", "stream", "session", "cancel", "disconnect", "hostile"))
        try:
            if kind == "hostile":
                sock = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                for _ in range(50):
                    sock.send(rng.randbytes(rng.randrange(1, 256)))
                sock.send_multipart([b"x" * 1024, b"y" * 1024])
                sock.close()
                continue
            if kind == "disconnect":
                sock = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                sock.send(msgpack.packb({"v": 1, "op": "generate", "id": rid, "prompt": rng.choice(PROMPTS)}))
                sock.poll(2000)
                sock.close()
                continue
            with Client(endpoint, timeout_s=60, retries=1) as client:
                start = time.monotonic()
                if kind == "cancel":
                    stream = client.generate(rng.choice(PROMPTS), request_id=rid, max_tokens=64, ignore_eos=True)
                    next(stream)
                    client.cancel(rid)
                    try:
                        for _ in stream:
                            pass
                    except ClientError as exc:
                        stats.error(f"{kind}:{exc.code}")
                    continue
                session = f"s{n}" if kind == "session" else None
                final = client.complete(
                    rng.choice(PROMPTS), request_id=rid, max_tokens=rng.randrange(4, 48), session=session
                )
                if final.get("type") == "done":
                    stats.done(rid, time.monotonic() - start)
                if session and rng.random() < 0.2:
                    client.end_session(session)
        except ClientError as exc:
            stats.error(f"{kind}:{exc.code}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="a provisioned device's appliance.toml (make provision)")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--interval", type=float, default=30.0, help="seconds per reported interval")
    p.add_argument("--out", default="bench/results/soak.json")
    args = p.parse_args()
    config = load_config(Path(args.config))
    endpoint = config.server.endpoints[0]
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "edge-appliance"), "--config", args.config, "serve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
    )
    try:
        with Client(endpoint, timeout_s=120, retries=3) as c:
            c.health()
        stats, stop = Stats(), threading.Event()
        run = f"soak{int(time.time())}"
        threads = [threading.Thread(target=worker, args=(n, endpoint, stop, stats, run)) for n in range(args.clients)]
        for t in threads:
            t.start()
        intervals = []
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            if daemon.poll() is not None:
                raise SystemExit(f"soak: the daemon exited with status {daemon.returncode} during the run")
            lat = sorted(stats.take())
            row = {
                "t_s": round(args.minutes * 60 - (end - time.monotonic()), 1),
                "rss_mib": round(rss_mib(daemon.pid), 1),
                "answered": len(lat),
                "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
                "p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None,
            }
            intervals.append(row)
            print(json.dumps(row), flush=True)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        with Client(endpoint, timeout_s=30) as c:
            health = c.health()
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    audit = AuditLog(config.audit_db)
    audited = {r.request_id for r in audit.rows() if r.op == "generate" and r.request_id.startswith(run)}
    audit.close()
    missing = sorted(stats.finished_ids - audited)
    first, last = intervals[0]["rss_mib"], intervals[-1]["rss_mib"]
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "intervals": intervals,
        "rss_growth_pct": round(100 * (last - first) / first, 2),
        "answered": len(stats.finished_ids),
        "answered_and_audited": len(stats.finished_ids) - len(missing),
        "answered_not_audited": missing[:20],
        "client_errors": stats.errors,
        "daemon_health_at_end": {k: health[k] for k in ("request_failures", "refused", "disconnect_cancels")},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "intervals"}, indent=2))
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
