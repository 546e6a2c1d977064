"""Speculative decoding through the daemon: drafts from the distilled student and from n-gram lookup, side by side.

Configurations, each a real device (sealed, installed) served by its own daemon process with the same explicit
``[engine] threads``, rounds alternating (A B C … A B C …), medians reported:

- **demo**: the demo *teacher* (build/demo/teacher-onnx, DeepSeek-V3) alone, with its distilled student sealed as
  its draft (``--draft``), with n-gram lookup; and the *student* alone (what `make run` served before). Prompts from
  the demo's domain, greedy, ``NEW`` tokens (end of sequence ignored, so every row decodes the same count).
- **real**: SmolLM2-135M-Instruct (the registry's GGUF, exported q4) without and with n-gram on an *extraction*
  workload (a maintenance log in the prompt, "list the error lines": answers copy spans of the prompt), a *free*
  workload (short answers, greedy) and a *sampled* one where drafts fail (the same at temperature 1.0, seeded).
- each at batch 1 (requests one after another) and 8 concurrent clients (aggregate tokens/s).

Every speculative configuration's greedy answers are compared with the plain one's (``identical_answers``: how
many of the batch-1 answers are the same text); tokens/s is
the daemon's own decode rate after the first token (``timings.tokens_per_s``), TTFT its ``ttft_ms``; acceptance
is accepted / drafted over the run; peak RSS is the daemon's ``VmHWM``.

Peers (optional, ``--llama-cpp BIN_DIR``): ``llama-server`` on the same GGUF, plain and with its n-gram speculation,
same threads, same prompts, its own process. onnxruntime-genai (when installed, ``pip install '.[bench]'``): its own
builder's int4 export of the same weights (the GGUF dequantized to a Hugging Face checkpoint), plain and with its
n-gram speculative decoder (``set_speculative_options(ngram_size=3, max_draft_tokens=4)``), each round in a fresh
process with the same threads, alternating with our daemon with n-gram in the same run. Its draft-model decoder
needs a builder-supported architecture: the demo's DeepSeek-V3 teacher is not one, and SmolLM2-135M has no smaller
draft with its tokenizer.

    .venv/bin/python bench/speculative.py --threads 2 --rounds 3     # results: bench/results/speculative.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.transport.client import Client  # noqa: E402
from bench.common import free_port, genai_build  # noqa: E402
from edge_models.registry_models import fetch  # noqa: E402

BIN = Path(sys.executable).parent
NEW = 128
CLIENTS = 8
DEMO_PROMPTS = [
    "Return the number of",
    "To reset the conveyor, first",
    "The pump pressure sensor reports",
    "def read(self, size):",
]
LOG = "\n".join(
    f"2026-11-{10 + i % 19:02d} {i % 24:02d}:{(7 * i) % 60:02d}:00 "
    + (f"ERROR E-{1000 + 37 * i} {unit} {fault}" if i % 3 == 1 else f"INFO {unit} {'started' if i % 2 else 'nominal'}")
    for i, (unit, fault) in enumerate(
        [
            (f"{kind} {n}", fault)
            for n, (kind, fault) in enumerate(
                [
                    ("conveyor", "motor overcurrent"),
                    ("pump", "seal leak detected"),
                    ("valve", "position sensor fault"),
                    ("press", "hydraulic pressure low"),
                    ("robot", "joint 3 torque limit"),
                    ("oven", "thermocouple open circuit"),
                ]
                * 4
            )
        ]
    )
)
EXTRACT = [
    [{"role": "user", "content": f"{LOG}\n\nList every ERROR line of this log exactly as written."}],
    [{"role": "user", "content": f"{LOG}\n\nCopy the lines about pumps, unchanged."}],
]
FREE = [
    [{"role": "user", "content": "Write a four-line poem about the sea."}],
    [{"role": "user", "content": "Give three tips for a job interview."}],
]


def run_cli(*argv: str) -> None:
    subprocess.run([str(BIN / argv[0]), *argv[1:]], check=True, stdout=subprocess.DEVNULL)


def device(name: str, model: Path, work: Path, threads: int, draft: Path | None = None) -> Path:
    """A device with ``model`` (and ``draft``) sealed and installed; returns its config (8 slots, no cache)."""
    site = work / name
    if (site / "appliance.toml").exists():
        return site / "appliance.toml"
    shutil.rmtree(site, ignore_errors=True)
    (site / "trust").mkdir(parents=True)
    run_cli("edge-provision", "keygen", "--vendor", str(site / "vendor"))
    run_cli("edge-provision", "enroll", "--keys", str(site / "keys"), "--out", str(site / "id.json"))
    shutil.copy(site / "vendor" / "vendor-ed25519.pub", site / "trust" / "vendor.pub")
    config = site / "appliance.toml"
    run_cli("edge-appliance", "init", "--out", str(config), "--state-dir", "state", "--trust-dir", "trust",
            "--key-dir", "keys", "--audit-db", "audit.db", "--endpoint", "tcp://127.0.0.1:5555")  # fmt: skip
    text = config.read_text()
    for key, value in (("max_batch", CLIENTS), ("threads", threads), ("max_connections_per_client", 16),
                       ("response_cache", 0), ("max_seq_len", 1024)):  # fmt: skip
        text = re.sub(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", text)
    config.write_text(text)
    run_cli("edge-provision", "seal", "--model", str(model), "--model-id", name, "--version", "1",
            "--signing-key", str(site / "vendor"), "--recipient", str(site / "id.json"), "--out", str(site / "bundle"),
            *(["--draft", str(draft)] if draft else []))  # fmt: skip
    run_cli("edge-provision", "install", str(site / "bundle"), "--state", str(site / "state"), "--trust",
            str(site / "trust"), "--keys", str(site / "keys"))  # fmt: skip
    return config


class Served:
    """One daemon process of one configuration (``speculative`` mode written into a copy of the config)."""

    def __init__(self, config: Path, mode: str, before: Path | None = None):
        """``before``: a worktree of an earlier revision to run instead (``--before``), which predates speculative
        decoding: its config lacks those keys and it keeps its own audit database (an older schema)."""
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        text = re.sub(r"(?m)^endpoints\s*=.*$", f'endpoints = ["{self.endpoint}"]', config.read_text())
        text = re.sub(r"(?m)^speculative\s*=.*$", f'speculative = "{mode}"', text)
        env = None
        if before is not None:
            text = re.sub(r"(?m)^(speculative|draft_tokens|speculative_max_batch)\s*=.*\n", "", text)
            text = re.sub(r"(?m)^audit_db\s*=.*$", 'audit_db = "audit-before.db"', text)
            env = {**os.environ, "PYTHONPATH": str(before)}
            mode = f"{mode}-before"
        self.config = config.with_name(f"bench-{mode}.toml")
        self.config.write_text(text)
        self.log = open(config.with_name(f"daemon-{mode}.log"), "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(BIN / "edge-appliance"), "--config", str(self.config), "serve"],
                                     stdout=self.log, stderr=self.log, env=env)  # fmt: skip
        with Client(self.endpoint, timeout_s=2, retries=300) as probe:
            probe.health()

    def peak_rss_mb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return round(int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def ask(endpoint: str, request: dict, out: list) -> None:
    with Client(endpoint, timeout_s=600) as client:
        out.append(client.complete(stream=False, **request))


def measure(endpoint: str, requests: list[dict], clients: int) -> dict:
    """Batch 1: the requests one after another. ``clients`` > 1: that many copies of each request at once."""
    done: list[dict] = []
    start = time.perf_counter()
    if clients == 1:
        for request in requests:
            ask(endpoint, request, done)
    else:
        for request in requests:
            threads = [threading.Thread(target=ask, args=(endpoint, request, done)) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    wall = time.perf_counter() - start
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    spec = [d["speculative"] for d in done if "speculative" in d]
    return {
        "tokens_per_s": [d["timings"].get("tokens_per_s") for d in done],
        "ttft_ms": [d["timings"]["ttft_ms"] for d in done],
        "total_ms": [d["timings"]["total_ms"] for d in done],
        "aggregate_tokens_per_s": tokens / wall,
        "drafted": sum(s["drafted"] for s in spec),
        "accepted": sum(s["accepted"] for s in spec),
        "texts": [d["text"] for d in done] if clients == 1 else [],
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 2)


def summarize(runs: list[dict], rss: list[int]) -> dict:
    rates = [r for run in runs for r in run["tokens_per_s"] if r]
    drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
    return {
        "decode_tokens_per_s_median": round(statistics.median(rates), 1),
        "aggregate_tokens_per_s_median": round(statistics.median(r["aggregate_tokens_per_s"] for r in runs), 1),
        "ttft_ms_p50": pct([t for r in runs for t in r["ttft_ms"]], 50),
        "latency_ms_p50": pct([t for r in runs for t in r["total_ms"]], 50),
        "latency_ms_p90": pct([t for r in runs for t in r["total_ms"]], 90),
        "acceptance": round(accepted / drafted, 3) if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "peak_rss_mb": max(rss),
    }


def llama_server(bin_dir: Path, gguf: Path, threads: int, extra: list[str], requests: list[dict]) -> dict:
    """llama-server on ``gguf`` (its own process, ``threads``), the chat requests one after another."""
    port = free_port()
    log = open(gguf.with_name(f"llama-server-{port}.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(gguf), "--port", str(port), "-t", str(threads),
                             "-tb", str(threads), "-c", "4096", "--parallel", "1", *extra],
                            stdout=log, stderr=log)  # fmt: skip
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        rates, texts = [], []
        for request in requests:
            body = {"messages": request["messages"], "max_tokens": request["max_tokens"], "temperature": 0,
                    "cache_prompt": False}  # fmt: skip
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
            rates.append(reply["timings"]["predicted_per_second"])
            texts.append(reply["choices"][0]["message"]["content"])
        return {"tokens_per_s": rates, "texts": texts}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def peers(args, gguf: Path, results: dict) -> dict:
    """llama-server plain and with its own n-gram speculation (two kinds), rounds alternating, on the extraction
    workload; each compared with our best configuration there."""
    reqs = [{"messages": m, "max_tokens": 200} for m in EXTRACT]
    rates: dict[str, list[float]] = {}
    modes = {"llama-server": [], "llama-server ngram-simple": ["--spec-type", "ngram-simple"],
             "llama-server ngram-mod": ["--spec-type", "ngram-mod"]}  # fmt: skip
    for _ in tqdm(range(args.rounds), desc="llama-server rounds"):
        for name, extra in modes.items():
            rates.setdefault(name, []).extend(
                llama_server(Path(args.llama_cpp), gguf, args.threads, extra, reqs)["tokens_per_s"]
            )
    ours = results["extraction"]["smollm2+ngram"]["batch_1"]["decode_tokens_per_s_median"]
    return {
        name: {"decode_tokens_per_s_median": round(statistics.median(r), 1),
               "ours_smollm2+ngram_vs_this": round(ours / statistics.median(r), 3)}
        for name, r in rates.items()
    }  # fmt: skip


def genai_export(gguf: Path, work: Path, threads: int) -> Path:
    """onnxruntime-genai's own int4 build of the GGUF's weights (dequantized to a Hugging Face checkpoint first: its
    builder reads only float GGUFs), our thread count overlaid in its config."""
    target, hf = work / "smollm2-genai-int4", work / "smollm2-hf"
    if not (target / "genai_config.json").exists():
        import torch
        from safetensors.torch import save_file

        from edge_models.gguf_import import GgufCheckpoint

        source = GgufCheckpoint(gguf)
        hf.mkdir(parents=True, exist_ok=True)
        source.config.save_pretrained(hf)
        names = sorted(set(source.tensors) - {"rope_freqs.weight"})
        save_file({n: torch.from_numpy(source.get(n)) for n in names}, str(hf / "model.safetensors"))
        source.save_tokenizer(hf)
    return genai_build(hf, target, "int4", threads, work / "genai-cache")


def genai_worker(path: Path, mode: str, prompts: list[list[int]], new: int) -> dict:
    """In a fresh process: onnxruntime-genai greedy on each prompt (a warm-up first), plain or n-gram speculative;
    decode tokens/s after the first token, as the daemon reports it."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(path))
    tokenizer = og.Tokenizer(model)
    eos = json.loads((path / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    rates, texts, drafted, accepted = [], [], 0, 0
    for i, ids in enumerate([prompts[0], *prompts]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, do_sample=False)
        if mode == "ngram":
            params.set_speculative_options(ngram_size=3, max_draft_tokens=4)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(ids, np.int32))
        gen.generate_next_token()
        first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        elapsed = time.perf_counter() - first
        out = list(gen.get_sequence(0))[len(ids) :]
        if i == 0:
            continue  # warm-up
        rates.append((len(out) - 1) / max(elapsed, 1e-9))
        texts.append(tokenizer.decode(np.array([t for t in out if t not in eos], np.int32)))
        if mode == "ngram":
            stats = gen.get_speculative_stats()
            drafted += int(stats["draft_tokens_evaluated"])
            accepted += int(stats["draft_tokens_accepted"])
    return {"tokens_per_s": rates, "texts": texts, "drafted": drafted, "accepted": accepted}


def genai_peers(args, gguf: Path, work: Path, config: Path) -> dict:
    """onnxruntime-genai plain and n-gram (each round a fresh process) alternating with our daemon with n-gram, on
    the extraction workload at batch 1, the same prompt tokens (SmolLM2's own chat template) and threads."""
    from transformers import AutoTokenizer

    target = genai_export(gguf, work, args.threads)
    template = AutoTokenizer.from_pretrained(work / "smollm2-hf")
    prompts = [list(template.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
               for m in EXTRACT]  # fmt: skip
    spec = work / "genai-prompts.json"
    spec.write_text(json.dumps({"prompts": prompts, "new": 200}))
    rows: dict[str, list[dict]] = {}
    for _ in tqdm(range(args.rounds), desc="onnxruntime-genai rounds"):
        served = Served(config, "ngram")
        try:
            rows.setdefault("ours smollm2+ngram", []).append(
                measure(served.endpoint, [{"messages": m, "max_tokens": 200} for m in EXTRACT], 1)
            )
        finally:
            served.stop()
        for mode in ("plain", "ngram"):
            cmd = [sys.executable, __file__, "--genai-worker", str(target), "--genai-mode", mode, "--genai-prompts",
                   str(spec), "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.setdefault(f"onnxruntime-genai {mode}", []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ours = statistics.median(r for run in rows["ours smollm2+ngram"] for r in run["tokens_per_s"] if r)
    out: dict = {"ours smollm2+ngram": {"decode_tokens_per_s_median": round(ours, 1)}}
    plain = [t for r in rows["onnxruntime-genai plain"] for t in r["texts"]]
    for name, runs in rows.items():
        if name.startswith("ours"):
            continue
        rate = statistics.median(r for run in runs for r in run["tokens_per_s"])
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        pairs = list(zip([t for r in runs for t in r["texts"]], plain, strict=True))
        out[name] = {"decode_tokens_per_s_median": round(rate, 1), "acceptance": round(accepted / drafted, 3)
                     if drafted else None, "identical_answers_vs_its_plain": f"{sum(a == b for a, b in pairs)}/"
                     f"{len(pairs)}", "ours_smollm2+ngram_vs_this": round(ours / rate, 3)}  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="[engine] threads of every daemon and peer (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, configurations alternating (default: 3)")
    p.add_argument("--work", default=str(ROOT / "build" / "bench-speculative"), help="devices and exports")
    p.add_argument("--demo", default=str(ROOT / "build" / "demo"), help="the demo build (make demo)")
    p.add_argument("--llama-cpp", help="llama.cpp bin directory (llama-server): the peer rows")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "speculative.json"))
    p.add_argument("--peers-only", action="store_true", help="rerun only the llama-server rows into --out")
    p.add_argument("--genai-only", action="store_true", help="rerun only the onnxruntime-genai rows (and ours with "
                   "n-gram beside them) into --out")  # fmt: skip
    p.add_argument("--genai-worker", help=argparse.SUPPRESS)
    p.add_argument("--genai-mode", help=argparse.SUPPRESS)
    p.add_argument("--genai-prompts", help=argparse.SUPPRESS)
    p.add_argument("--before", metavar="REV", help="also serve SmolLM2 (plain) from this git revision: the daemon's "
                   "decode speed before and after a change, in the same run")  # fmt: skip
    args = p.parse_args()
    if args.genai_worker:
        spec = json.loads(Path(args.genai_prompts).read_text())
        print(json.dumps(genai_worker(Path(args.genai_worker), args.genai_mode, spec["prompts"], spec["new"])))
        return 0
    work, demo = Path(args.work), Path(args.demo)
    work.mkdir(parents=True, exist_ok=True)
    gguf = fetch("smollm2")
    if args.peers_only:
        saved = json.loads(Path(args.out).read_text())
        saved["results"]["extraction_peers"] = peers(args, gguf, saved["results"])
        Path(args.out).write_text(json.dumps(saved, indent=2) + "\n")
        print(json.dumps(saved["results"]["extraction_peers"], indent=2))
        return 0
    smol = work / "smollm2-q4"
    if not (smol / "model.onnx").exists():
        run_cli("edge-models", "export", "--gguf", str(gguf), "--out", str(smol), "--quantize", "q4")
    try:
        import onnxruntime_genai  # noqa: F401

        with_genai = True
    except ImportError:
        print("onnxruntime-genai is not installed (pip install '.[bench]'); its rows are skipped")
        with_genai = False
    if args.genai_only:
        saved = json.loads(Path(args.out).read_text())
        smol_device = device("smollm2", smol, work, args.threads)
        saved["results"]["extraction_genai"] = genai_peers(args, gguf, work, smol_device)
        Path(args.out).write_text(json.dumps(saved, indent=2) + "\n")
        print(json.dumps(saved["results"]["extraction_genai"], indent=2))
        return 0

    devices = {
        "demo-teacher": device("demo-teacher", demo / "teacher-onnx", work, args.threads),
        "demo-teacher+draft": device("demo-teacher-draft", demo / "teacher-onnx", work, args.threads, demo / "onnx"),
        "demo-student": device("demo-student", demo / "onnx", work, args.threads),
        "smollm2": device("smollm2", smol, work, args.threads),
    }
    demo_reqs = [{"prompt": t, "max_tokens": NEW, "ignore_eos": True} for t in DEMO_PROMPTS]
    workloads = {
        "demo": [
            ("teacher", "demo-teacher", "off"),
            ("teacher+student-draft", "demo-teacher+draft", "draft"),
            ("teacher+ngram", "demo-teacher", "ngram"),
            ("student", "demo-student", "off"),
        ],
        "extraction": [("smollm2", "smollm2", "off"), ("smollm2+ngram", "smollm2", "ngram")],
        "free": [("smollm2", "smollm2", "off"), ("smollm2+ngram", "smollm2", "ngram")],
        "sampled": [("smollm2", "smollm2", "off"), ("smollm2+ngram", "smollm2", "ngram")],
    }
    requests = {
        "demo": demo_reqs,
        "extraction": [{"messages": m, "max_tokens": 200} for m in EXTRACT],
        "free": [{"messages": m, "max_tokens": 96} for m in FREE],
        # where drafts fail: creative sampling at temperature 1.0 rarely repeats what came before (seeded, so the
        # answers are still comparable between configurations)
        "sampled": [{"messages": m, "max_tokens": 96, "temperature": 1.0, "seed": 7} for m in FREE],
    }
    before = None
    if args.before:
        before = work / f"before-{args.before}"
        if not before.exists():
            git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before]
            subprocess.run(git, check=True, stdout=subprocess.DEVNULL)
        for workload in ("extraction", "free"):
            workloads[workload].append((f"smollm2 ({args.before})", "smollm2", "off"))
    runs: dict = {w: {name: {1: [], CLIENTS: []} for name, _, _ in rows} for w, rows in workloads.items()}
    rss: dict = {w: {name: [] for name, _, _ in rows} for w, rows in workloads.items()}
    steps = args.rounds * sum(len(rows) for rows in workloads.values())
    with tqdm(total=steps, desc="speculative rounds", unit="daemon") as bar:
        for _ in range(args.rounds):
            for workload, rows in workloads.items():
                for name, dev, mode in rows:
                    served = Served(devices[dev], mode, before if name.endswith(f"({args.before})") else None)
                    try:
                        for clients in (1, CLIENTS):
                            runs[workload][name][clients].append(measure(served.endpoint, requests[workload], clients))
                        rss[workload][name].append(served.peak_rss_mb())
                    finally:
                        served.stop()
                    bar.update()

    results: dict = {}
    for workload, rows in workloads.items():
        anchor = rows[0][0]
        table = {}
        for name, _, mode in rows:
            one, many = runs[workload][name][1], runs[workload][name][CLIENTS]
            row = {"speculative": mode, "batch_1": summarize(one, rss[workload][name]),
                   f"clients_{CLIENTS}": summarize(many, rss[workload][name])}  # fmt: skip
            # greedy answers equal to the anchor's (the plain configuration of the same model)?
            if name != "student":
                pairs = [(x, y) for a, b in zip(one, runs[workload][anchor][1], strict=True)
                         for x, y in zip(a["texts"], b["texts"], strict=True)]  # fmt: skip
                row["identical_answers"] = f"{sum(x == y for x, y in pairs)}/{len(pairs)}"
            table[name] = row
        for row in table.values():
            for key in ("batch_1", f"clients_{CLIENTS}"):
                metric = "decode_tokens_per_s_median" if key == "batch_1" else "aggregate_tokens_per_s_median"
                row[key]["vs_" + anchor] = round(row[key][metric] / table[anchor][key][metric], 3)
        results[workload] = table
    if args.llama_cpp:
        results["extraction_peers"] = peers(args, gguf, results)
    if with_genai:
        results["extraction_genai"] = genai_peers(args, gguf, work, devices["smollm2"])
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "platform": platform.platform()},
        "threads": args.threads,
        "rounds": args.rounds,
        "new_tokens_demo": NEW,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
