"""Inference benchmark suite: our engine and daemon against what an operator would otherwise install.

Two models, measured in one run with the same prompt (32 tokens, 128 new tokens, greedy, end of
sequence ignored), median of ``--rounds``:

- ``demo``: the served demo student (pruned + distilled DeepSeek-V3, from ``make demo``);
- ``qwen2``: a Qwen2 of realistic small shape (hidden 1024, 12 layers, 16 heads, 4 KV heads,
  FFN 2816, vocab 32000) built from its config with random weights (speed does not depend on
  weight values).

Batch-1 decode tokens/s and time to first token for transformers ``generate`` (torch CPU),
onnxruntime-genai (its own model builder on the same checkpoint, fp32 and int4; Qwen2 only: the
builder has no DeepSeek-V3), our engine in-process and our daemon through ZeroMQ (fp32, q8, q4);
"bandwidth achieved" (weight bytes read per token × tokens/s) next to the machine's memory-read
bandwidth measured in the same run; aggregate tokens/s and latency percentiles with 1/4/8/16
concurrent clients against the daemon and the same load served one at a time; ONNX Runtime
thread settings. Results: ``bench/results/inference.json`` and a printed table.

    .venv/bin/python bench/inference.py            # after `make provision`; ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
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
from appliance.engine import DecoderSpec  # noqa: E402
from appliance.engine.ort_engine import OrtEngine  # noqa: E402
from appliance.transport.client import Client  # noqa: E402
from bench.common import daemon  # noqa: E402

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
def build_qwen2(root: Path, demo_tokenizer: Path) -> Path:
    """Random-weight Qwen2 checkpoint; its tokenizer is the demo's, padded with added tokens to 32000."""
    hf = root / "hf"
    if (hf / "config.json").exists():
        return hf
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoModelForCausalLM, Qwen2Config

    from edge_models.tokenizer import save_tokenizer, special_ids

    tok = Tokenizer.from_file(str(demo_tokenizer))
    tok.add_tokens(
        [AddedToken(f"<|x{i}|>", special=False) for i in range(QWEN2_SHAPE["vocab_size"] - tok.get_vocab_size())]
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN2_SHAPE, max_position_embeddings=2048, tie_word_embeddings=False, **special_ids(tok))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(hf)
    save_tokenizer(tok, hf)
    return hf


def onnx_variants(hf: Path, root: Path, fp32_dir: Path | None = None) -> dict[str, Path]:
    from edge_models.quantize import quantize

    fp32 = fp32_dir or root / "onnx-fp32"
    if not (fp32 / "model.onnx").exists():
        from transformers import AutoModelForCausalLM

        from edge_models.export import export_decoder

        export_decoder(AutoModelForCausalLM.from_pretrained(hf, local_files_only=True), fp32)
        shutil.copy(hf / "tokenizer.json", fp32 / "tokenizer.json")
    out = {"fp32": fp32}
    for mode in ("q8", "q4"):
        out[mode] = root / f"onnx-{mode}"
        if not (out[mode] / "model.onnx").exists():
            quantize(fp32, out[mode], mode)
    return out


def genai_variants(hf: Path, root: Path) -> dict[str, Path]:
    out = {}
    for precision in ("fp32", "int4"):
        target = root / f"genai-{precision}"
        if not (target / "genai_config.json").exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(hf),
                    "-o",
                    str(target),
                    "-p",
                    precision,
                    "-e",
                    "cpu",
                    "-c",
                    str(root / "genai-cache"),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        out[precision] = target
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


# -- runners -----------------------------------------------------------------------------------
def _summary(ttft: list[float], rates: list[float], weight_bytes: int | None) -> dict:
    r = {
        "tokens_per_s": statistics.median(rates),
        "ttft_ms": statistics.median(ttft) * 1000,
        "runs": [round(x, 2) for x in rates],
    }
    if weight_bytes:
        r["weight_bytes_per_token"] = weight_bytes
        r["bandwidth_achieved_GBps"] = weight_bytes * r["tokens_per_s"] / 1e9
    return r


def run_transformers(hf: Path, ids: list[int], new: int, rounds: int, weight_bytes: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)
    ttft, rates = [], []
    with torch.no_grad():
        model.generate(input_ids=x, max_new_tokens=4, **kw)  # warm-up
        for _ in range(rounds):
            t0 = time.perf_counter()
            model.generate(input_ids=x, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            model.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, **kw)
            t2 = time.perf_counter()
            ttft.append(t1 - t0)
            rates.append((new - 1) / ((t2 - t1) - (t1 - t0)))
    return _summary(ttft, rates, weight_bytes)


def run_genai(path: Path, ids: list[int], new: int, rounds: int, weight_bytes: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    ttft, rates = [], []
    for r in range(rounds + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(ids, np.int32))
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(new - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        if r:  # the first run warms up
            ttft.append(t1 - t0)
            rates.append((new - 1) / (t2 - t1))
        del gen
    return _summary(ttft, rates, weight_bytes)


def make_engine(onnx_dir: Path, ids: list[int], new: int, **engine_kw) -> OrtEngine:
    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_text())
    return OrtEngine(
        (onnx_dir / "model.onnx").read_bytes(), spec, num_slots=1, max_seq_len=len(ids) + new + 1, **engine_kw
    )


def engine_round(eng: OrtEngine, ids: list[int], new: int) -> tuple[float, float]:
    """One batch-1 greedy generation in process: (time to first token s, decode tokens/s)."""
    t0 = time.perf_counter()
    logits = eng.prefill([(0, ids)])
    t1 = time.perf_counter()
    for _ in range(new - 1):
        logits = eng.decode([(0, int(np.argmax(logits[0])))])
    t2 = time.perf_counter()
    eng.release(0)
    return t1 - t0, (new - 1) / (t2 - t1)


def run_engine(onnx_dir: Path, ids: list[int], new: int, rounds: int, **engine_kw) -> dict:
    eng = make_engine(onnx_dir, ids, new, **engine_kw)
    engine_round(eng, ids, new)  # warm-up
    ttft, rates = zip(*(engine_round(eng, ids, new) for _ in range(rounds)), strict=True)
    return _engine_summary(eng, list(ttft), list(rates))


def _engine_summary(eng: OrtEngine, ttft: list[float], rates: list[float]) -> dict:
    out = _summary(ttft, rates, eng.spec.weight_bytes)
    out["copied_bytes_per_decode_step"] = eng.stats.copied_bytes / max(eng.stats.decode_steps, 1)
    return out


def provision(onnx_dir: Path, root: Path, name: str, max_batch: int) -> Path:
    """Seal ``onnx_dir`` for the demo device, install it in its own state dir, write a config."""
    demo, vendor = ROOT / ".demo", ROOT / "build" / "vendor"
    site = root / f"device-{name}"
    config = site / "appliance.toml"
    exe = Path(sys.executable).parent
    bundle = root / f"bundle-{name}"
    if not (site / "state" / "current").exists():
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run(
            [
                str(exe / "edge-provision"),
                "seal",
                "--model",
                str(onnx_dir),
                "--model-id",
                f"bench-{name}",
                "--version",
                "1",
                "--signing-key",
                str(vendor / "vendor-ed25519.key"),
                "--recipient",
                str(demo / "device-identity.json"),
                "--out",
                str(bundle),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                str(exe / "edge-provision"),
                "install",
                str(bundle),
                "--state",
                str(site / "state"),
                "--trust",
                str(demo / "trust"),
                "--keys",
                str(demo / "credentials"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    config.write_text(
        render_config(
            str(site / "state"),
            str(demo / "trust"),
            str(demo / "credentials"),
            str(site / "audit.db"),
            max_batch=max_batch,
        )
    )
    return config


def daemon_round(client: Client, prompt: str, new: int) -> tuple[float, float, float]:
    """One streamed request, timed on the client: (first token s, tokens/s after it, server's tokens/s)."""
    t0 = time.perf_counter()
    first = None
    for event in client.generate(prompt, max_tokens=new, ignore_eos=True):
        if first is None:
            first = time.perf_counter()
        final = event
    t2 = time.perf_counter()
    return first - t0, (final["usage"]["completion_tokens"] - 1) / (t2 - first), final["timings"]["tokens_per_s"]


def engine_vs_daemon(
    onnx_dir: Path, endpoint: str, prompt: str, ids: list[int], new: int, rounds: int
) -> tuple[dict, dict]:
    """Alternate in-process and daemon rounds (ABAB…) so machine noise hits both alike."""
    eng = make_engine(onnx_dir, ids, new)
    e_ttft, e_rates, d_ttft, d_rates, server = [], [], [], [], []
    with Client(endpoint, timeout_s=600) as client:
        engine_round(eng, ids, new)
        daemon_round(client, prompt, new)  # warm-ups
        for _ in range(rounds):
            t, r = engine_round(eng, ids, new)
            e_ttft.append(t)
            e_rates.append(r)
            t, r, s = daemon_round(client, prompt, new)
            d_ttft.append(t)
            d_rates.append(r)
            server.append(s)
    remote = _summary(d_ttft, d_rates, eng.spec.weight_bytes)
    remote["server_side_tokens_per_s"] = statistics.median(server)
    return _engine_summary(eng, e_ttft, e_rates), remote


def load_test(endpoint: str, prompt: str, clients: int, per_client: int, new: int, one_at_a_time: bool) -> dict:
    """``clients`` threads each send ``per_client`` requests; latencies from the common start."""
    latencies, ttfts, tokens = [], [], [0]
    lock = threading.Lock()
    gate = threading.Lock()  # held per request when serving one at a time
    start = time.perf_counter()

    def worker() -> None:
        with Client(endpoint, timeout_s=600) as c:
            for _ in range(per_client):
                t0 = time.perf_counter()
                if one_at_a_time:
                    gate.acquire()
                try:
                    first = None
                    for event in c.generate(prompt, max_tokens=new, ignore_eos=True):
                        first = first or time.perf_counter()
                        final = event
                finally:
                    if one_at_a_time:
                        gate.release()
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
        "one_at_a_time": one_at_a_time,
        "aggregate_tokens_per_s": tokens[0] / wall,
        "latency_ms": pct(latencies),
        "ttft_ms": pct(ttfts),
    }


# -- the suite ---------------------------------------------------------------------------------
def bench_model(
    name: str, hf: Path, variants: dict[str, Path], genai: dict[str, Path] | None, root: Path, args
) -> dict:
    spec = {p: DecoderSpec.from_json((d / "decoder.json").read_text()) for p, d in variants.items()}
    prompt, ids = prompt_ids(variants["fp32"] / "tokenizer.json", spec["fp32"].bos_token_id)
    new, rounds = args.new_tokens, args.rounds
    res: dict = {"prompt_tokens": len(ids), "new_tokens": new, "batch1": {}}
    b1 = res["batch1"]
    print(f"[{name}] transformers generate", flush=True)
    b1["transformers fp32"] = run_transformers(hf, ids, new, rounds, spec["fp32"].weight_bytes)
    if genai:
        for precision, path in genai.items():
            print(f"[{name}] onnxruntime-genai {precision}", flush=True)
            wb = spec["fp32" if precision == "fp32" else "q4"].weight_bytes
            b1[f"onnxruntime-genai {precision}"] = run_genai(path, ids, new, rounds, wb)
    if precision_for_threads := args.threads_precision:
        res["threads"] = {}
        for threads in (1, 2):
            for spin in (True, False):
                key = f"threads={threads} spin={'on' if spin else 'off'}"
                print(f"[{name}] engine {precision_for_threads} {key}", flush=True)
                res["threads"][key] = run_engine(
                    variants[precision_for_threads], ids, new, rounds, threads=threads, spin=spin
                )
        res["threads"]["copy each step (residency off)"] = run_engine(
            variants[precision_for_threads], ids, new, rounds, keep_resident=False
        )
    for precision, path in variants.items():
        config = provision(path, root, f"{name}-{precision}", max_batch=max(args.clients))
        with daemon(config, name=f"bench-{name}-{precision}") as endpoint:
            print(f"[{name}] engine and daemon {precision}, alternating", flush=True)
            b1[f"engine {precision}"], b1[f"daemon {precision}"] = engine_vs_daemon(
                path, endpoint, prompt, ids, new, rounds
            )
            if precision in args.load_precisions:
                res.setdefault("load", {})[precision] = load = []
                for clients in args.clients:
                    print(f"[{name}] daemon {precision}: {clients} concurrent clients", flush=True)
                    load.append(load_test(endpoint, prompt, clients, args.per_client, new, False))
                    if clients == args.one_at_a_time:
                        print(f"[{name}] daemon {precision}: same load one at a time", flush=True)
                        load.append(load_test(endpoint, prompt, clients, args.per_client, new, True))
    return res


def targets(model: dict, bandwidth: float) -> dict:
    b1 = model["batch1"]
    t = {}
    if "onnxruntime-genai int4" in b1:
        ratio = b1["daemon q4"]["tokens_per_s"] / b1["onnxruntime-genai int4"]["tokens_per_s"]
        t["daemon q4 / genai int4 >= 1.3"] = {"value": ratio, "met": ratio >= 1.3}
    frac = b1["engine fp32"]["bandwidth_achieved_GBps"] * 1e9 / bandwidth
    t["engine fp32 bandwidth >= 70% of memory read"] = {"value": frac, "met": frac >= 0.7}
    overhead = {}
    for p in PRECISIONS:
        overhead[p] = 1 - b1[f"daemon {p}"]["tokens_per_s"] / b1[f"engine {p}"]["tokens_per_s"]
    t["daemon overhead <= 5%"] = {"value": overhead, "met": all(v <= 0.05 for v in overhead.values())}
    for precision, runs in model.get("load", {}).items():
        loads = {(r["clients"], r["one_at_a_time"]): r for r in runs}
        if (8, False) in loads and (1, False) in loads:
            ratio = loads[(8, False)]["aggregate_tokens_per_s"] / loads[(1, False)]["aggregate_tokens_per_s"]
            t[f"8 clients aggregate >= 3x single stream ({precision})"] = {"value": ratio, "met": ratio >= 3}
            p99 = loads[(8, False)]["ttft_ms"]["p99"]
            t[f"8 clients p99 TTFT < 1 s ({precision})"] = {"value_ms": p99, "met": p99 < 1000}
    return t


def print_table(name: str, model: dict, bandwidth: float) -> None:
    print(f"\n== {name}: {model['prompt_tokens']}-token prompt, {model['new_tokens']} new tokens, batch 1 ==")
    print(f"{'runtime':30} {'tok/s':>8} {'TTFT ms':>8} {'MB/token':>9} {'GB/s':>6} {'% of mem BW':>11}")
    for key, r in {**model["batch1"], **{f"  {k}": v for k, v in model.get("threads", {}).items()}}.items():
        bw = r.get("bandwidth_achieved_GBps")
        mb = r.get("weight_bytes_per_token", 0) / 1e6
        print(
            f"{key:30} {r['tokens_per_s']:8.1f} {r['ttft_ms']:8.1f} {mb:9.1f} {bw or 0:6.2f} "
            f"{100 * (bw or 0) * 1e9 / bandwidth:10.1f}%"
        )
    for precision, runs in model.get("load", {}).items():
        for r in runs:
            lat, ttft = r["latency_ms"], r["ttft_ms"]
            how = "one at a time" if r["one_at_a_time"] else "concurrent"
            print(
                f"daemon {precision:4} {r['clients']:2d} clients {how:13} {r['aggregate_tokens_per_s']:8.1f} tok/s  "
                f"latency p50/p90/p99 {lat['p50']:.0f}/{lat['p90']:.0f}/{lat['p99']:.0f} ms  "
                f"TTFT p50/p99 {ttft['p50']:.0f}/{ttft['p99']:.0f} ms"
            )
    for k, v in model["targets"].items():
        print(f"target {k}: {'MET' if v['met'] else 'MISSED'} ({v.get('value', v.get('value_ms'))})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=["demo", "qwen2"],
        choices=["demo", "qwen2"],
        help="models to measure (default: both)",
    )
    p.add_argument("--demo", default="build/demo", help="demo build directory (default: build/demo)")
    p.add_argument("--work", default="build/bench", help="where benchmark models and bundles are built")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default: 128)")
    p.add_argument("--rounds", type=int, default=5, help="repetitions; medians are reported (default: 5)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrency levels")
    p.add_argument("--per-client", type=int, default=2, help="requests each concurrent client sends (default: 2)")
    p.add_argument(
        "--one-at-a-time",
        type=int,
        default=8,
        help="also serve this concurrency level's load one request at a time (default: 8)",
    )
    p.add_argument(
        "--load-precisions",
        nargs="+",
        default=["q4", "fp32"],
        choices=PRECISIONS,
        help="daemon precisions put under concurrent load (default: q4 fp32)",
    )
    p.add_argument("--threads-precision", default="q4", help="precision for the thread-setting sweep ('' skips)")
    p.add_argument("--out", default="bench/results/inference.json", help="results file")
    args = p.parse_args()
    import logging

    import onnxruntime
    import torch

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    work, demo = ROOT / args.work, ROOT / args.demo
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
        },
        "memory_read_bandwidth_GBps": bandwidth / 1e9,
        "memory_read_bandwidth_detail_GBps": {k: v / 1e9 for k, v in measured.items()},
        "models": {},
    }
    try:
        import onnxruntime_genai

        result["machine"]["onnxruntime_genai"] = onnxruntime_genai.__version__
        have_genai = True
    except ImportError:
        have_genai = False
        print("onnxruntime-genai is not installed (pip install '.[bench]'); its rows are skipped")
    for name in args.models:
        if name == "demo":
            student = demo / "student"
            hf, variants = student / "student", onnx_variants(student / "student", work / "demo", student / "onnx")
            genai = None  # the genai model builder has no DeepSeek-V3 support
        else:
            hf = build_qwen2(work / "qwen2", demo / "teacher" / "tokenizer.json")
            variants = onnx_variants(hf, work / "qwen2")
            genai = genai_variants(hf, work / "qwen2") if have_genai else None
        model = bench_model(name, hf, variants, genai, work, args)
        model["targets"] = targets(model, bandwidth)
        model["memory_read_bandwidth_GBps"] = bandwidth / 1e9  # this run's, next to this model's figures
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        result["models"] = {**previous.get("models", {}), **result["models"], name: model}
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nmemory read bandwidth {bandwidth / 1e9:.2f} GB/s")
    for name, model in result["models"].items():
        print_table(name, model, model["memory_read_bandwidth_GBps"] * 1e9)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
