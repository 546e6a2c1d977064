"""Inference benchmark: our engine and daemon against what an operator would otherwise install.

One model per run, ``qwen2`` (default): a Qwen2 of realistic small shape (hidden 1024, 12 layers,
16 heads, 4 KV heads, FFN 2816, vocab 32000) built from its config with random weights (speed does
not depend on weight values); or ``demo``: the served demo student (DeepSeek-V3, from ``make demo``).
Same prompt (32 tokens), 128 new tokens, greedy, end of sequence ignored.

Honesty rules, all enforced here:
- every runtime gets the same explicit intra-op thread count (``--threads``, recorded): our engine
  and daemon through their settings, onnxruntime-genai through a ``genai_config.json`` overlay
  (``session_options.intra_op_num_threads``), torch through ``torch.set_num_threads``;
- every runtime and precision runs in its own fresh process: in-process rows are a new worker
  process per round (``--worker``), each daemon its own server process;
- rounds alternate between runtimes (A B C … A B C …), so machine noise hits all alike;
- medians and every run are reported, and the node count of every graph measured.

Rows: transformers ``generate`` (fp32), onnxruntime-genai (its own model builder, fp32 and int4),
our engine in process and our daemon through ZeroMQ at fp32/q8/q4 on the fused graph, and the
traced graph at q4 (the graph before fusion, in the same run); aggregate tokens/s and latency
percentiles with 1 and 8 concurrent clients against the q4 daemon. The device keys and bundles
are made here (``edge-provision`` CLI), so no other build step is needed.

    .venv/bin/python bench/inference.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.config import render_config  # noqa: E402
from appliance.engine import DecoderSpec, create_engine  # noqa: E402
from appliance.transport.client import Client  # noqa: E402
from bench.common import daemon, genai_build, genai_generate  # noqa: E402

TEXT = (
    "Return the number of bytes in the buffer. Raise ValueError if the socket is closed or the "
    "argument is not a string; the optional timeout gives the number of seconds to wait before"
)
PRECISIONS = ("fp32", "q8", "q4")
QWEN2_SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    vocab_size=32000,
)


def memory_read_bandwidth(size_mb: int = 1024, repeats: int = 5) -> dict:
    """Bytes/s reading a buffer far larger than any cache, best of ``repeats``: a numpy sum (one
    thread) and a torch sum (all cores, as the engines read weights)."""
    import torch

    a = np.ones(size_mb * (1 << 20) // 4, np.float32)
    t_all = torch.from_numpy(a)
    best = {"one_thread": 0.0, "all_threads": 0.0}
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best["one_thread"] = max(best["one_thread"], a.nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        t_all.sum()
        best["all_threads"] = max(best["all_threads"], a.nbytes / (time.perf_counter() - t))
    return best


# -- models ------------------------------------------------------------------------------------
def build_qwen2(root: Path) -> Path:
    """Random-weight Qwen2 checkpoint (safetensors) with a small BPE tokenizer padded with added tokens to 32000."""
    hf = root / "hf"
    if (hf / "config.json").exists():
        return hf
    import torch
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, Qwen2Config

    from edge_models.tokenizer import save_tokenizer, special_ids, train_tokenizer

    tok = train_tokenizer([TEXT] * 4 + [TEXT.upper(), TEXT[::-1]], vocab_size=512)
    tok.add_tokens(
        [AddedToken(f"<|x{i}|>", special=False) for i in range(QWEN2_SHAPE["vocab_size"] - tok.get_vocab_size())]
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN2_SHAPE, max_position_embeddings=2048, tie_word_embeddings=False, **special_ids(tok))
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(hf)
    save_tokenizer(tok, hf)
    return hf


def _edge_models(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "edge-models"), *args], check=True, stdout=subprocess.DEVNULL)


def onnx_variants(hf: Path, root: Path) -> dict[str, Path]:
    """Our graphs: fused at fp32/q8/q4 (``edge-models export``) and the traced graph at q4 (before fusion)."""
    from edge_models.quantize import quantize

    out = {}
    for precision in PRECISIONS:
        out[precision] = root / f"fused-{precision}"
        if not (out[precision] / "model.onnx").exists():
            quant = [] if precision == "fp32" else ["--quantize", precision]
            _edge_models("export", "--model", str(hf), "--out", str(out[precision]), *quant)
    traced = root / "traced-fp32"
    if not (traced / "model.onnx").exists():
        _edge_models("export", "--model", str(hf), "--out", str(traced), "--traced")
    out["traced q4"] = root / "traced-q4"
    if not (out["traced q4"] / "model.onnx").exists():
        quantize(traced, out["traced q4"], "q4")
    return out


def genai_variants(hf: Path, root: Path, threads: int) -> dict[str, Path]:
    """onnxruntime-genai's own builder at fp32 and int4, with our thread count overlaid in its config."""
    return {p: genai_build(hf, root / f"genai-{p}", p, threads, root / "genai-cache") for p in ("fp32", "int4")}


def node_counts(paths: dict[str, Path]) -> dict[str, dict]:
    """Nodes of each graph as written (what ONNX Runtime starts from), and its operator mix."""
    import collections

    import onnx

    out = {}
    for name, path in paths.items():
        graph_file = path if path.suffix == ".onnx" else next(iter(sorted(path.glob("*.onnx"))))
        ops = collections.Counter(n.op_type for n in onnx.load(str(graph_file), load_external_data=False).graph.node)
        out[name] = {"nodes": sum(ops.values()), "ops": dict(ops.most_common())}
    return out


def prompt_ids(tokenizer_path: Path, bos: int, n: int = 32) -> tuple[str, list[int]]:
    """A prompt text that tokenizes to exactly ``n`` ids with BOS (as the daemon will tokenize it)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    for cut in range(n - 1, 0, -1):
        text = tok.decode(tok.encode(TEXT).ids[:cut])
        ids = [bos, *tok.encode(text).ids]
        if len(ids) <= n:
            return text, ids
    raise RuntimeError("no prompt")


# -- in-process workers (one fresh process per runtime per round) ---------------------------------
def worker_transformers(path: Path, ids: list[int], new: int, threads: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=x, max_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(input_ids=x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, **kw)
        t2 = time.perf_counter()
    return t1 - t0, (new - 1) / ((t2 - t1) - (t1 - t0))


def worker_genai(path: Path, ids: list[int], new: int, threads: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    model = og.Model(str(path))  # threads: overlaid in its genai_config.json
    genai_generate(model, ids, new)  # warm-up
    return genai_generate(model, ids, new)


def make_engine(onnx_dir: Path, ids: list[int], new: int, threads: int):
    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_text())
    model = (onnx_dir / "model.onnx").read_bytes()
    return create_engine("onnxruntime", model, spec, num_slots=1, max_seq_len=len(ids) + new + 1, threads=threads)


def engine_round(eng, ids: list[int], new: int) -> tuple[float, float]:
    """One batch-1 greedy generation in process: (time to first token s, decode tokens/s)."""
    t0 = time.perf_counter()
    logits = eng.prefill([(0, ids)])
    t1 = time.perf_counter()
    for _ in range(new - 1):
        logits = eng.decode([(0, int(np.argmax(logits[0])))])
    t2 = time.perf_counter()
    eng.release(0)
    return t1 - t0, (new - 1) / (t2 - t1)


def worker_engine(path: Path, ids: list[int], new: int, threads: int) -> tuple[float, float]:
    eng = make_engine(path, ids, new, threads)
    engine_round(eng, ids, new)  # warm-up
    before = eng.stats.copied_bytes
    ttft, rate = engine_round(eng, ids, new)
    if eng.stats.copied_bytes != before and eng.spec.cache == "static":
        raise RuntimeError("a static-cache decode copied cache bytes on the host")
    return ttft, rate


WORKERS = {"transformers": worker_transformers, "genai": worker_genai, "engine": worker_engine}


def run_worker(kind: str, path: Path, ids: list[int], new: int, threads: int) -> tuple[float, float]:
    """Run one round of ``kind`` in a fresh Python process; returns (TTFT s, decode tokens/s)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--path", str(path), "--threads", str(threads)]
        + ["--new-tokens", str(new), "--ids", ",".join(map(str, ids))],
        check=True,
        capture_output=True,
        text=True,
    )
    ttft, rate = json.loads(proc.stdout.strip().splitlines()[-1])
    return ttft, rate


# -- daemon ------------------------------------------------------------------------------------
def device_keys(root: Path) -> dict[str, Path]:
    """A vendor signing key and one enrolled device, made with the same CLI an operator uses."""
    exe = Path(sys.executable).parent / "edge-provision"
    keys = {"vendor": root / "vendor", "creds": root / "device" / "credentials", "trust": root / "device" / "trust"}
    keys["identity"] = root / "device-identity.json"
    if not keys["identity"].exists():
        subprocess.run([str(exe), "keygen", "--vendor", str(keys["vendor"])], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [str(exe), "enroll", "--keys", str(keys["creds"]), "--out", str(keys["identity"]), "--device-id", "bench"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        keys["trust"].mkdir(parents=True, exist_ok=True)
        shutil.copy(keys["vendor"] / "vendor-ed25519.pub", keys["trust"] / "vendor.pub")
    return keys


def provision(onnx_dir: Path, root: Path, name: str, max_batch: int, threads: int) -> Path:
    """Seal ``onnx_dir``, install it in its own state dir, write a config with ``threads`` set."""
    keys = device_keys(root / "keys")
    exe = Path(sys.executable).parent / "edge-provision"
    site, bundle = root / f"device-{name}", root / f"bundle-{name}"
    if not (site / "state" / "current").exists():
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run(
            [str(exe), "seal", "--model", str(onnx_dir), "--model-id", f"bench-{name}", "--version", "1"]
            + ["--signing-key", str(keys["vendor"] / "vendor-ed25519.key"), "--recipient", str(keys["identity"])]
            + ["--out", str(bundle)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [str(exe), "install", str(bundle), "--state", str(site / "state"), "--trust", str(keys["trust"])]
            + ["--keys", str(keys["creds"])],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    text = render_config(
        str(site / "state"), str(keys["trust"]), str(keys["creds"]), str(site / "audit.db"), max_batch=max_batch
    )
    config = site / "appliance.toml"
    config.write_text(text.replace("threads = 0 ", f"threads = {threads} ", 1))
    return config


def daemon_round(client: Client, prompt: str, new: int) -> tuple[float, float]:
    """One streamed request, timed on the client: (first token s, tokens/s after it)."""
    t0 = time.perf_counter()
    first = None
    for event in client.generate(prompt, max_tokens=new, ignore_eos=True):
        if first is None:
            first = time.perf_counter()
        final = event
    t2 = time.perf_counter()
    return first - t0, (final["usage"]["completion_tokens"] - 1) / (t2 - first)


def load_test(endpoint: str, prompt: str, clients: int, per_client: int, new: int) -> dict:
    """``clients`` threads each send ``per_client`` requests; latencies from the common start."""
    latencies, ttfts, tokens = [], [], [0]
    lock = threading.Lock()
    start = time.perf_counter()

    def worker() -> None:
        with Client(endpoint, timeout_s=600) as c:
            for _ in range(per_client):
                t0 = time.perf_counter()
                first = None
                for event in c.generate(prompt, max_tokens=new, ignore_eos=True):
                    first = first or time.perf_counter()
                    final = event
                done = time.perf_counter()
                with lock:
                    latencies.append(done - t0)
                    ttfts.append(first - t0)
                    tokens[0] += final["usage"]["completion_tokens"]

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    def pct(values: list[float]) -> dict:
        return {p: float(np.percentile(values, int(p[1:]))) * 1000 for p in ("p50", "p90", "p99")}

    return {
        "clients": clients,
        "requests": len(latencies),
        "aggregate_tokens_per_s": tokens[0] / wall,
        "latency_ms": pct(latencies),
        "ttft_ms": pct(ttfts),
    }


# -- the suite ---------------------------------------------------------------------------------
def _summary(ttft: list[float], rates: list[float], weight_bytes: int | None) -> dict:
    r = {
        "tokens_per_s": statistics.median(rates),
        "ttft_ms": statistics.median(ttft) * 1000,
        "runs": [round(x, 2) for x in rates],
        "ttft_runs_ms": [round(x * 1000, 1) for x in ttft],
    }
    if weight_bytes:
        r["weight_bytes_per_token"] = weight_bytes
        r["bandwidth_achieved_GBps"] = weight_bytes * r["tokens_per_s"] / 1e9
    return r


def bench_model(name: str, hf: Path, variants: dict[str, Path], genai: dict[str, Path], root: Path, args) -> dict:
    spec = {p: DecoderSpec.from_json((d / "decoder.json").read_text()) for p, d in variants.items()}
    prompt, ids = prompt_ids(hf / "tokenizer.json", spec["fp32"].bos_token_id)
    new, threads = args.new_tokens, args.threads
    res: dict = {"prompt_tokens": len(ids), "new_tokens": new, "threads": threads, "batch1": {}}
    # Every row: (runtime kind, path, weight bytes per token). In-process rows run in a fresh worker each round.
    rows: dict[str, tuple[str, Path, int]] = {}
    if "transformers" not in args.skip:
        rows["transformers fp32"] = ("transformers", hf, spec["fp32"].weight_bytes)
    for precision, path in genai.items():
        same = spec["fp32" if precision == "fp32" else "q4"]
        rows[f"onnxruntime-genai {precision}"] = ("genai", path, same.weight_bytes)
    for precision, path in variants.items():
        rows[f"engine {precision}"] = ("engine", path, spec[precision].weight_bytes)
    daemons = [p for p in PRECISIONS if p in variants]
    configs = {p: provision(variants[p], root, f"{name}-{p}", max(args.clients), threads) for p in daemons}
    timings: dict[str, tuple[list, list]] = {k: ([], []) for k in [*rows, *(f"daemon {p}" for p in daemons)]}
    with contextlib.ExitStack() as stack:
        endpoints = {p: stack.enter_context(daemon(configs[p], name=f"bench-{name}-{p}")) for p in daemons}
        clients = {p: stack.enter_context(Client(endpoints[p], timeout_s=600)) for p in daemons}
        for p in daemons:
            daemon_round(clients[p], prompt, 8)  # warm-up
        for r in range(args.rounds):
            for row, (kind, path, _) in rows.items():
                print(f"[{name}] round {r + 1}/{args.rounds}: {row}", flush=True)
                ttft, rate = run_worker(kind, path, ids, new, threads)
                timings[row][0].append(ttft)
                timings[row][1].append(rate)
            for p in daemons:
                print(f"[{name}] round {r + 1}/{args.rounds}: daemon {p}", flush=True)
                ttft, rate = daemon_round(clients[p], prompt, new)
                timings[f"daemon {p}"][0].append(ttft)
                timings[f"daemon {p}"][1].append(rate)
        for p in args.load_precisions:
            res.setdefault("load", {})[p] = load = []
            for n in args.clients:
                print(f"[{name}] daemon {p}: {n} concurrent clients", flush=True)
                load.append(load_test(endpoints[p], prompt, n, args.per_client, new))
    for row, (ttft, rates) in timings.items():
        wb = rows[row][2] if row in rows else spec[row.split()[-1]].weight_bytes
        res["batch1"][row] = _summary(ttft, rates, wb)
    return res


def targets(model: dict) -> dict:
    """The issue's targets, met or missed, from this run's medians."""
    b1, t = model["batch1"], {}

    def ratio(key: str, a: str, b: str, goal: float) -> None:
        if a in b1 and b in b1:
            value = b1[a]["tokens_per_s"] / b1[b]["tokens_per_s"]
            t[key] = {"value": round(value, 3), "met": value >= goal}

    ratio("daemon q4 / genai int4 decode >= 1.0", "daemon q4", "onnxruntime-genai int4", 1.0)
    ratio("daemon q4 / genai int4 decode >= 1.2 (stretch)", "daemon q4", "onnxruntime-genai int4", 1.2)
    ratio("daemon fp32 / genai fp32 decode >= 1.0", "daemon fp32", "onnxruntime-genai fp32", 1.0)
    ratio("engine q4 fused / traced decode (before/after)", "engine q4", "engine traced q4", 0.0)
    if "daemon q4" in b1 and "onnxruntime-genai int4" in b1:
        ours, theirs = b1["daemon q4"]["ttft_ms"], b1["onnxruntime-genai int4"]["ttft_ms"]
        t["daemon q4 TTFT <= genai int4 TTFT"] = {"value_ms": [round(ours, 1), round(theirs, 1)], "met": ours <= theirs}
    for precision, runs in model.get("load", {}).items():
        loads = {r["clients"]: r for r in runs}
        if 8 in loads and 1 in loads:
            value = loads[8]["aggregate_tokens_per_s"] / loads[1]["aggregate_tokens_per_s"]
            t[f"8 clients aggregate >= 3x single stream ({precision})"] = {"value": round(value, 2), "met": value >= 3}
            p99 = loads[8]["ttft_ms"]["p99"]
            t[f"8 clients p99 TTFT < 1 s ({precision})"] = {"value_ms": round(p99, 1), "met": p99 < 1000}
    return t


def print_table(name: str, model: dict, bandwidth: float) -> None:
    print(f"\n== {name}: {model['prompt_tokens']}-token prompt, {model['new_tokens']} new tokens, batch 1 ==")
    print(f"{'runtime':30} {'tok/s':>8} {'TTFT ms':>8} {'MB/token':>9} {'GB/s':>6} {'% of mem BW':>11}")
    for key, r in model["batch1"].items():
        bw = r.get("bandwidth_achieved_GBps")
        mb = r.get("weight_bytes_per_token", 0) / 1e6
        print(
            f"{key:30} {r['tokens_per_s']:8.1f} {r['ttft_ms']:8.1f} {mb:9.1f} {bw or 0:6.2f} "
            f"{100 * (bw or 0) * 1e9 / bandwidth:10.1f}%"
        )
    for precision, runs in model.get("load", {}).items():
        for r in runs:
            lat, ttft = r["latency_ms"], r["ttft_ms"]
            print(
                f"daemon {precision:4} {r['clients']:2d} concurrent clients {r['aggregate_tokens_per_s']:8.1f} tok/s  "
                f"latency p50/p90/p99 {lat['p50']:.0f}/{lat['p90']:.0f}/{lat['p99']:.0f} ms  "
                f"TTFT p50/p99 {ttft['p50']:.0f}/{ttft['p99']:.0f} ms"
            )
    for graph, counts in model.get("graphs", {}).items():
        print(f"graph {graph:22} {counts['nodes']:5d} nodes")
    for k, v in model["targets"].items():
        print(f"target {k}: {'MET' if v['met'] else 'MISSED'} ({v.get('value', v.get('value_ms'))})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="build/bench", help="where benchmark models and bundles are built")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default: 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default: 128)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (default: 3)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrency levels (default: 1 8)")
    p.add_argument("--per-client", type=int, default=2, help="requests each concurrent client sends (default: 2)")
    p.add_argument(
        "--load-precisions", nargs="*", default=["q4"], choices=PRECISIONS, help="daemons put under load (default: q4)"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["transformers", "genai"], help="rows to leave out")
    p.add_argument("--out", default="bench/results/inference.json", help="results file")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one measured round in this fresh process
        ids = [int(x) for x in args.ids.split(",")]
        print(json.dumps(WORKERS[args.worker](Path(args.path), ids, args.new_tokens, args.threads)))
        return 0
    import onnxruntime
    import torch

    work = ROOT / args.work / "qwen2"
    work.mkdir(parents=True, exist_ok=True)
    measured = memory_read_bandwidth()
    bandwidth = max(measured.values())
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "load_average_at_start": os.getloadavg(),
        },
        "memory_read_bandwidth_GBps": bandwidth / 1e9,
        "memory_read_bandwidth_detail_GBps": {k: v / 1e9 for k, v in measured.items()},
    }
    genai = {}
    if "genai" not in args.skip:
        try:
            import onnxruntime_genai

            result["machine"]["onnxruntime_genai"] = onnxruntime_genai.__version__
        except ImportError:
            print("onnxruntime-genai is not installed (pip install '.[bench]'); its rows are skipped")
    print("[qwen2] building the checkpoint and graphs", flush=True)
    hf = build_qwen2(work)
    variants = onnx_variants(hf, work)
    if "onnxruntime_genai" in result["machine"]:
        genai = genai_variants(hf, work, args.threads)
    model = bench_model("qwen2", hf, variants, genai, work, args)
    graphs = {**{f"ours {k}": v for k, v in variants.items()}, **{f"genai {k}": v for k, v in genai.items()}}
    model["graphs"] = node_counts(graphs)
    model["targets"] = targets(model)
    model["memory_read_bandwidth_GBps"] = bandwidth / 1e9
    result["machine"]["load_average_at_end"] = os.getloadavg()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result["models"] = {**previous.get("models", {}), "qwen2": model}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.2f} GB/s")
    print_table("qwen2", model, bandwidth)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
