"""A real-scale build and serve: a checkpoint with DeepSeek-R1-Distill-Qwen-1.5B's (or -7B's) exact
config (random bf16 weights, safetensors, an R1-Distill-shaped tokenizer trained locally) through
export, q4 quantization, seal, install and the daemon.

Every stage runs in its own process; its wall time and peak RSS (``ru_maxrss`` of that child, from
``os.wait4``) are recorded. Then: bundle size, daemon load time and RSS (``VmRSS``/``VmHWM`` from
/proc), time to first token at 32/512/2048-token prompts and decode tokens/s through the daemon,
the same figures for the same q4 graph in process (its own process, same engine settings), and
onnxruntime-genai int4 built from the same checkpoint (its own process, same thread count) when
installed. Stages already done are reused (delete ``--work`` to rebuild).

    python bench/scale.py                   # 1.5B shape -> bench/results/scale.json
    python bench/scale.py --shape 7b        # 7B shape   -> bench/results/scale-7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
PROMPT_LENGTHS = (32, 512, 2048)
NEW_TOKENS = 64
MAX_SEQ_LEN = 2304  # the longest prompt plus room to generate

# config.json of deepseek-ai/DeepSeek-R1-Distill-Qwen-{1.5B,7B} (weights random; tokenizer built locally)
MODEL = "q4"  # the exported precision, and the directory under --work that holds it (--precision)
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=10000.0, tie_word_embeddings=False),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, rope_theta=10000.0, tie_word_embeddings=False),
    # bench/inference.py's realistic Qwen2 (~0.2 B): the size where weights used to load inline (3-5x their bytes)
    "qwen2-200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=10000.0, tie_word_embeddings=False),
}  # fmt: skip


# -- stages (each runs in a child process: `scale.py --stage NAME`) -----------------------------
def stage_checkpoint(work: Path, shape: str) -> None:
    """Random bf16 weights written tensor by tensor into safetensors, plus config and tokenizer files."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from edge_models import reference_tokenizers as R
    from edge_models.corpus import build_corpus

    ckpt = work / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    tok = R.qwen_style(build_corpus().train[:6000], 8192)
    bos, eos = tok.token_to_id("<｜begin▁of▁sentence｜>"), tok.token_to_id("<｜end▁of▁sentence｜>")
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        **SHAPES[shape],
    }
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    config = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>", "add_bos_token": True}
    R.save(tok, ckpt, config, R.R1_DISTILL_TEMPLATE)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    # Sharded like the published checkpoints (~2 GB per file, with the index transformers reads), so a
    # 7B shape is written with a few GB of RSS: each shard is generated, saved and dropped in turn.
    gen = torch.Generator().manual_seed(0)
    names, shards, index = list(shapes), [], {}
    while names:
        shard, size = [], 0
        while names and size < 2 << 30:
            shard.append(names.pop(0))
            size += 2 * int(np.prod(shapes[shard[-1]]))
        shards.append(shard)
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: torch.ones(shapes[name], dtype=torch.bfloat16)
            if name.endswith("norm.weight")
            else (torch.randn(shapes[name], generator=gen, dtype=torch.bfloat16) * 0.02)
            for name in shard
        }
        save_file(tensors, str(ckpt / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
        del tensors
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )


def stage_export(work: Path) -> None:
    """The fused streaming builder: safetensors read tensor by tensor, quantized to q4 as they are read."""
    _run(
        [str(BIN / "edge-models"), "export", "--model", str(work / "checkpoint"), "--out", str(work / MODEL),
         *(["--quantize", MODEL] if MODEL != "fp32" else [])]
    )  # fmt: skip


def stage_seal(work: Path) -> None:
    site = work / "site"
    _run(
        [
            str(BIN / "edge-provision"),
            "seal",
            "--model",
            str(work / MODEL),
            "--model-id",
            "r1-distill-shape",
            "--version",
            "1",
            "--signing-key",
            str(site / "vendor" / "vendor-ed25519.key"),
            "--recipient",
            str(site / "device-identity.json"),
            "--out",
            str(work / "bundle"),
        ]
    )


def stage_install(work: Path) -> None:
    site = work / "site"
    _run(
        [
            str(BIN / "edge-provision"),
            "install",
            str(work / "bundle"),
            "--state",
            str(site / "state"),
            "--trust",
            str(site / "trust"),
            "--keys",
            str(site / "credentials"),
        ]
    )


def stage_engine(work: Path, threads: int, rounds: int) -> None:
    """The q4 graph in process with the daemon's engine settings; prints its figures as JSON."""
    import numpy as np

    q4 = work / MODEL
    t0 = time.perf_counter()
    eng = in_process_engine(q4, threads)
    load = time.perf_counter() - t0
    prompts = json.loads((work / "prompts.json").read_text())
    out = {"load_s": load, "ttft_ms": {}, "rounds": rounds}
    for n in PROMPT_LENGTHS:
        ids = prompts[str(n)]["ids"]
        times = []
        for _ in range(rounds + 1):  # the first warms up
            start = time.perf_counter()
            logits = eng.prefill([(0, ids)])
            int(np.argmax(logits[0]))
            times.append(time.perf_counter() - start)
            eng.release(0)
        out["ttft_ms"][n] = statistics.median(times[1:]) * 1000
    ids = prompts["32"]["ids"]
    rates = []
    for _ in range(rounds):
        logits = eng.prefill([(0, ids)])
        tokens = [int(np.argmax(logits[0]))]
        start = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            logits = eng.decode([(0, tokens[-1])])
            tokens.append(int(np.argmax(logits[0])))
        rates.append((NEW_TOKENS - 1) / (time.perf_counter() - start))
        eng.release(0)
    out["decode_tokens_per_s"] = statistics.median(rates)
    # How many greedy tokens pass before the first one with text a client can be sent (random weights
    # sample ids outside the tokenizer's vocabulary, which decode to nothing, and partial characters).
    from tokenizers import Tokenizer

    from appliance.serving.detokenize import Detokenizer

    detok = Detokenizer(Tokenizer.from_file(str(q4 / "tokenizer.json")).decode)
    emitted = [bool(detok.step(tokens[: n + 1], finished=False)) for n in range(len(tokens))]
    out["first_text_after_tokens"] = emitted.index(True) + 1 if any(emitted) else None
    print("RESULT " + json.dumps(out))


def stage_decrypt(work: Path) -> None:
    """Decryption alone: every payload file of the installed bundle into memory, as the loader does it."""
    from provisioning.install import current_bundle
    from provisioning.keys import DEVICE_X25519, load_trusted_vendors, load_x25519, wipe

    site = work / "site"
    bundle = current_bundle(site / "state", load_trusted_vendors(site / "trust"))
    key = bundle.unwrap_key(load_x25519(DEVICE_X25519, site / "credentials"))
    t0 = time.perf_counter()
    files = {f.id: bundle.decrypt_into(f.id, key) for f in bundle.files()}
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"decrypt_s": round(seconds, 2), "bytes": sum(len(b) for b in files.values())}))
    for buf in files.values():
        wipe(buf)
    wipe(key)


def in_process_engine(q4: Path, threads: int):
    """The graph in ``q4`` with the daemon's engine settings (4 slots, ``MAX_SEQ_LEN``, spinning)."""
    from appliance.config import EngineConfig
    from appliance.engine import DecoderSpec, create_engine
    from appliance.engine.weights import WeightBuffer

    spec = DecoderSpec.from_json((q4 / "decoder.json").read_text())
    data, external = q4 / "model.onnx.data", None
    if data.exists():  # borrowed in place and built in pieces, as the daemon's loader does
        external = {data.name: WeightBuffer(data.stat().st_size)}
        with open(data, "rb", buffering=0) as f:
            f.readinto(external[data.name].view())
    return create_engine("onnxruntime", (q4 / "model.onnx").read_bytes(), spec, num_slots=4,
                         max_seq_len=MAX_SEQ_LEN, threads=threads, external=external, spin=True,
                         load_pieces=EngineConfig().load_pieces)  # fmt: skip


def stage_genai_build(work: Path) -> None:
    _run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(work / "checkpoint"),
            "-o",
            str(work / "genai-int4"),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(work / "genai-cache"),
        ]
    )


def stage_genai(work: Path, threads: int, rounds: int) -> None:
    import onnxruntime_genai as og

    from bench.common import genai_generate

    path = work / "genai-int4"
    cfg = json.loads((path / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (path / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    t0 = time.perf_counter()
    model = og.Model(str(path))
    load = time.perf_counter() - t0
    prompts = json.loads((work / "prompts.json").read_text())
    out = {"load_s": load, "ttft_ms": {}, "rounds": rounds}

    def generate(ids: list[int], new: int) -> tuple[float, float]:
        return genai_generate(model, ids, new)

    for n in PROMPT_LENGTHS:
        ids = prompts[str(n)]["ids"]
        out["ttft_ms"][n] = statistics.median(generate(ids, 1)[0] for _ in range(rounds + 1)) * 1000
    out["decode_tokens_per_s"] = statistics.median(generate(prompts["32"]["ids"], NEW_TOKENS)[1] for _ in range(rounds))
    print("RESULT " + json.dumps(out))


# -- driver --------------------------------------------------------------------------------------
def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def measured(name: str, args: argparse.Namespace, extra: list[str] = ()) -> dict:
    """Run one stage in a child process: wall seconds, peak RSS (the child and its children), output."""
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(args.work), "--shape", args.shape,
           "--precision", MODEL]  # fmt: skip
    cmd += ["--threads", str(args.threads), "--rounds", str(args.rounds), "--lengths", args.lengths, *extra]
    print(f"[scale] {name} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed ({proc.returncode})")
    # ru_maxrss of a waited-for child covers the largest of it and its own waited-for descendants
    row = {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            row.update(json.loads(line[7:]))
    print(f"[scale] {name}: {row}", flush=True)
    return row


def prepare_site(work: Path) -> None:
    """Vendor key, device enrollment and trust (setup, not timed): what `make provision` does once."""
    site = work / "site"
    if (site / "device-identity.json").exists():
        return
    _run([str(BIN / "edge-provision"), "keygen", "--vendor", str(site / "vendor")])
    _run(
        [str(BIN / "edge-provision"), "enroll", "--keys", str(site / "credentials"), "--out",
         str(site / "device-identity.json"), "--device-id", "scale-bench"]
    )  # fmt: skip
    (site / "trust").mkdir(parents=True, exist_ok=True)
    (site / "trust" / "vendor.pub").write_bytes((site / "vendor" / "vendor-ed25519.pub").read_bytes())


def write_prompts(work: Path) -> dict:
    """Prompt texts that the daemon tokenizes to exactly 32/512/2048 ids (BOS included)."""
    from tokenizers import Tokenizer

    from appliance.engine import DecoderSpec
    from edge_models.corpus import build_corpus

    tok = Tokenizer.from_file(str(work / MODEL / "tokenizer.json"))
    spec = DecoderSpec.from_json((work / MODEL / "decoder.json").read_text())
    head = [] if spec.bos_token_id is None else [spec.bos_token_id]
    stream = tok.encode("\n\n".join(build_corpus().heldout + build_corpus().train[:400]), add_special_tokens=False).ids
    prompts = {}
    for n in PROMPT_LENGTHS:
        cut = n - len(head)
        while True:
            text = tok.decode(stream[:cut])
            ids = [*head, *tok.encode(text, add_special_tokens=False).ids]
            if len(ids) <= n:
                break
            cut -= 1
        prompts[str(n)] = {"text": text, "ids": ids}
    (work / "prompts.json").write_text(json.dumps(prompts))
    return prompts


def proc_status(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[k].split()[0]) / 1024) for k in ("VmRSS", "VmHWM")}


def write_site_config(work: Path, threads: int, endpoint: str = "tcp://127.0.0.1:5555") -> Path:
    """The device's ``appliance.toml``: 4 slots, ``MAX_SEQ_LEN``, ``threads``, no response cache."""
    from appliance.config import render_config

    text = render_config("state", "trust", "credentials", "audit.db", endpoint, max_batch=4)
    text = text.replace("threads = 0 ", f"threads = {threads} ").replace(
        "max_seq_len = 512", f"max_seq_len = {MAX_SEQ_LEN}"
    )
    text = text.replace("response_cache = 256", "response_cache = 0").replace(
        "max_new_tokens = 256", "max_new_tokens = 128"
    )
    config = work / "site" / "appliance.toml"
    config.write_text(text)
    return config


def start_daemon(work: Path, threads: int) -> tuple[subprocess.Popen, str, float]:
    """The daemon on the installed bundle (4 slots, ``MAX_SEQ_LEN``, ``threads``); returns once it answers."""
    from appliance.transport.client import Client, ClientError
    from bench.common import free_port

    site = work / "site"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    write_site_config(work, threads, endpoint)
    start = time.perf_counter()
    log = open(work / "daemon.log", "w")  # noqa: SIM115 - the daemon's stderr, read by daemon_log_times()
    proc = subprocess.Popen([str(BIN / "edge-appliance"), "--config", str(site / "appliance.toml"), "serve"],
                            stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    with Client(endpoint, timeout_s=600, retries=1) as client:
        while True:  # the daemon binds its socket only once the model is loaded and warmed up
            try:
                client.health()
                return proc, endpoint, time.perf_counter() - start
            except ClientError:
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited ({proc.returncode}) while loading") from None


def daemon_log_times(work: Path) -> dict:
    """The daemon's own account of its start: model load (verify, decrypt, session) and warm-up seconds."""
    import re

    text = (work / "daemon.log").read_text()
    loaded, warm = re.search(r"loaded model .* in ([0-9.]+)s", text), re.search(r"warm-up took ([0-9.]+)s", text)
    return {"load_model_s": float(loaded[1]) if loaded else None, "warm_up_s": float(warm[1]) if warm else None}


def serve(work: Path, threads: int, rounds: int) -> dict:
    """Start the daemon on the installed bundle; load time, RSS, client-side and server-side TTFT, decode rate."""
    from appliance.transport.client import Client

    prompts = json.loads((work / "prompts.json").read_text())
    proc, endpoint, load = start_daemon(work, threads)
    try:
        with Client(endpoint, timeout_s=600, retries=1) as client:
            loaded_rss = proc_status(proc.pid)
            out = {
                **daemon_log_times(work),
                "load_s": round(load, 1),
                "rss_after_load_mb": loaded_rss["VmRSS"],
                "peak_rss_load_mb": loaded_rss["VmHWM"],
            }
            out["ttft_ms"], out["server_ttft_ms"] = {}, {}
            for n in PROMPT_LENGTHS:
                client_ms, server_ms = [], []
                for r in range(rounds + 1):  # the first warms up
                    t0 = time.perf_counter()
                    first = None
                    # one token: its reply is the first the client sees either way (random weights mostly
                    # sample ids whose text is empty or a partial character, which streaming holds back)
                    for event in client.generate(prompts[str(n)]["text"], max_tokens=1, ignore_eos=True):
                        first = first or time.perf_counter()
                        final = event
                    if r:
                        client_ms.append((first - t0) * 1000)
                        server_ms.append(final["timings"]["ttft_ms"])
                out["ttft_ms"][n] = statistics.median(client_ms)
                out["server_ttft_ms"][n] = statistics.median(server_ms)
            rates = []
            for _ in range(rounds):
                final = client.complete(
                    prompts["32"]["text"], max_tokens=NEW_TOKENS, ignore_eos=True, reasoning="inline"
                )
                rates.append(final["timings"]["tokens_per_s"])
            out["decode_tokens_per_s"] = statistics.median(rates)
            # a client streaming a longer answer sees its first token event only once there is text
            t0, first = time.perf_counter(), None
            for event in client.generate(prompts["32"]["text"], max_tokens=NEW_TOKENS, ignore_eos=True):
                if event["type"] == "token" and first is None:
                    first = time.perf_counter()
            out["first_text_event_ms_32"] = (first - t0) * 1000 if first else None
            out["steady_rss_mb"] = proc_status(proc.pid)["VmRSS"]
            out["peak_rss_mb"] = proc_status(proc.pid)["VmHWM"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def ttft_probe(work: Path, threads: int, rounds: int) -> dict:
    """Daemon and in-process engine rounds alternated (ABAB) at every prompt length, so machine load hits
    both alike: the client's time to its first event (one token asked for, so that event arrives whether
    or not the token has text) and the server's own TTFT, against the engine's prefill + argmax."""
    import numpy as np

    from appliance.transport.client import Client

    prompts = json.loads((work / "prompts.json").read_text())
    proc, endpoint, load = start_daemon(work, threads)
    out = {"rounds": rounds, "daemon_ready_s": round(load, 1), **daemon_log_times(work)}
    try:
        eng = in_process_engine(work / MODEL, threads)
        with Client(endpoint, timeout_s=600, retries=1) as client:
            for n in PROMPT_LENGTHS:
                prompt = prompts[str(n)]
                engine_ms, client_ms, server_ms = [], [], []
                for r in range(rounds + 1):
                    t0 = time.perf_counter()
                    int(np.argmax(eng.prefill([(0, prompt["ids"])])[0]))
                    t1 = time.perf_counter()
                    eng.release(0)
                    first = None
                    for event in client.generate(prompt["text"], max_tokens=1, ignore_eos=True):
                        first = first or time.perf_counter()
                        final = event
                    if r:  # the first round warms up
                        engine_ms.append((t1 - t0) * 1000)
                        client_ms.append((first - t1) * 1000)
                        server_ms.append(final["timings"]["ttft_ms"])
                out[str(n)] = {
                    "prompt_tokens": len(prompt["ids"]),
                    "engine_ms": round(statistics.median(engine_ms), 1),
                    "daemon_client_ms": round(statistics.median(client_ms), 1),
                    "daemon_server_ttft_ms": round(statistics.median(server_ms), 1),
                }
                print(f"[scale] ttft {n}: {out[str(n)]}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def stage_load(work: Path, pieces: int) -> None:
    """``load_model`` as the daemon runs it with ``[engine] load_pieces = pieces``, in this fresh process: load
    seconds, peak (``VmHWM``) and steady (``VmRSS`` after load) RSS, bytes released; then decode and prefill speed."""
    import dataclasses

    from appliance.config import load_config
    from appliance.loader import load_model

    config = load_config(work / "site" / "appliance.toml")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, load_pieces=pieces))
    import onnx  # noqa: F401 - the libraries load_model imports lazily: their code is not the model's memory
    import onnxruntime  # noqa: F401

    base = proc_status(os.getpid())["VmRSS"]
    t0 = time.perf_counter()
    model = load_model(config)
    load_s = time.perf_counter() - t0
    status = proc_status(os.getpid())
    engine = model.engine
    logits = engine.prefill([(0, list(range(5, 37)))])
    for _ in range(4):
        logits = engine.decode([(0, int(logits[0].argmax()))])
    t0 = time.perf_counter()
    steps = 48
    for _ in range(steps):
        logits = engine.decode([(0, int(logits[0].argmax()))])
    decode = steps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    engine.prefill([(1, list(range(5, 261)))])
    prefill = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "pieces": pieces, "load_s": round(load_s, 2), "python_baseline_mb": base, "peak_rss_mb": status["VmHWM"],
        "steady_rss_mb": status["VmRSS"], "released_mb": getattr(engine, "released_bytes", 0) >> 20,
        "kv_cache_mb": engine.cache_bytes() >> 20,
        "decode_tokens_per_s": round(decode, 2), "prefill_256_s": round(prefill, 2),
    }))  # fmt: skip


def weights_bytes(work: Path) -> int:
    """The exported weights' bytes: model.onnx.data where the export wrote one, else the inline graph's size."""
    data = work / MODEL / "model.onnx.data"
    return (data if data.exists() else work / MODEL / "model.onnx").stat().st_size


def load_probe(args: argparse.Namespace, model_bytes: int) -> dict:
    """Decryption alone and ``load_model`` with ``load_pieces`` 1 and 8, each in its own fresh process, rounds
    alternated; medians and ratios to the model's bytes (RSS includes the Python process's own baseline)."""
    import statistics

    rows: dict[str, list[dict]] = {"decrypt": [], "pieces_1": [], "pieces_8": []}
    measured("decrypt", args)  # untimed: the bundle into the page cache, so no round pays the disk alone
    for _ in range(args.rounds):
        rows["decrypt"].append(measured("decrypt", args))
        for pieces in (1, 8):
            rows[f"pieces_{pieces}"].append(measured("load", args, ["--pieces", str(pieces)]))
    mb = model_bytes / 2**20
    decrypt_s = statistics.median(r["decrypt_s"] for r in rows["decrypt"])
    out: dict = {"rounds": args.rounds, "model_mb": round(mb), "decrypt_s": decrypt_s, "runs": rows}
    for name in ("pieces_1", "pieces_8"):
        med = {k: statistics.median(r[k] for r in rows[name]) for k in rows[name][0] if k != "pieces"}
        out[name] = {
            **med,
            "peak_vs_model": round(med["peak_rss_mb"] / mb, 2),
            "steady_vs_model": round(med["steady_rss_mb"] / mb, 2),
            # the same without the process's own Python and libraries (VmRSS before load_model), which dominate at
            # small sizes: what loading the model costs
            "load_peak_vs_model": round((med["peak_rss_mb"] - med["python_baseline_mb"]) / mb, 2),
            "load_steady_vs_model": round((med["steady_rss_mb"] - med["python_baseline_mb"]) / mb, 2),
            "load_vs_decrypt": round(med["load_s"] / decrypt_s, 2),
        }
    return out


def reload_probe(work: Path, threads: int, reloads: int, model_bytes: int) -> dict:
    """The daemon's memory across `reloads` reloads of the same bundle (what `systemctl reload` does): VmRSS after
    the start and after each reload (once the previous model is retired: a request served by the new one), VmHWM
    (the peak, old and new model both resident while the new one loads), as MB and as multiples of the weights."""
    from appliance.transport.client import Client

    proc, endpoint, ready_s = start_daemon(work, threads)
    config = str(work / "site" / "appliance.toml")
    rows = []
    try:
        with Client(endpoint, timeout_s=600) as client:
            client.complete("Return the", max_tokens=16)
            rows.append({"after": "start", "ready_s": round(ready_s, 2), **proc_status(proc.pid)})
            for n in range(1, reloads + 1):
                start = time.perf_counter()
                _run([str(BIN / "edge-appliance"), "--config", config, "reload", "--pid", str(proc.pid)])
                took = time.perf_counter() - start
                client.complete("Return the", max_tokens=16)  # served by the new model: the old one is retired
                deadline = time.monotonic() + 30
                while client.health()["models_retiring"] and time.monotonic() < deadline:
                    time.sleep(0.1)  # the daemon's own report: the previous model freed and the heap trimmed
                held = client.health()["models_retiring"]
                row = {"after": f"reload {n}", "reload_s": round(took, 2), "models_retiring": held}
                rows.append({**row, **proc_status(proc.pid)})
                print(f"[scale] {rows[-1]}", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    mb = model_bytes / 2**20
    for row in rows:
        row.update(rss_x=round(row["VmRSS"] / mb, 2), hwm_x=round(row["VmHWM"] / mb, 2))
    first, last = rows[0]["VmRSS"], rows[-1]["VmRSS"]
    return {
        "weights_mb": round(mb),
        "rows": rows,
        "growth_after_reloads": round(last / first - 1, 3),
        "target": {"rss after reloads within 10% of after start": {"value": round(last / first, 3),
                                                                   "met": last <= 1.10 * first}},
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.5b", help="checkpoint shape (default: 1.5b)")
    p.add_argument("--work", type=Path, help="build directory (default: build/scale-SHAPE, -fp32 appended for fp32)")
    p.add_argument("--precision", choices=("q4", "fp32"), default="q4", help="exported weights (default: q4)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per figure (default: 3)")
    p.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai comparison")
    p.add_argument("--out", type=Path, help="results file (default: bench/results/scale[-SHAPE].json)")
    p.add_argument("--serve-only", action="store_true", help="re-measure the daemon and in-process figures only")
    p.add_argument("--ttft-probe", action="store_true", help="only alternate daemon and in-process TTFT rounds")
    p.add_argument(
        "--load-probe",
        action="store_true",
        help="only alternate decryption alone and load_model with load_pieces 1 and 8 (fresh processes)",
    )
    p.add_argument(
        "--reload-probe", type=int, metavar="N", help="only start the daemon and reload it N times: RSS after each"
    )
    p.add_argument("--build-only", action="store_true", help="stop after install (no daemon, no comparisons)")
    p.add_argument("--lengths", default="32,512,2048", help="prompt lengths to time (default: 32,512,2048)")
    p.add_argument("--daemon-only", action="store_true", help="serve through the daemon only (no in-process, genai)")
    stages = ("checkpoint", "export", "seal", "install", "engine", "decrypt", "genai_build", "genai", "load")
    p.add_argument(
        "--stage",
        choices=stages,
        help="run only this stage, in this process, on --work (a full run starts each stage as a child this way; "
        "e.g. --stage checkpoint writes just the random-weight checkpoint)",
    )
    p.add_argument("--pieces", type=int, default=8, help="load_pieces for --stage load (default: 8)")
    args = p.parse_args()
    global PROMPT_LENGTHS, MODEL
    MODEL = args.precision
    PROMPT_LENGTHS = tuple(int(n) for n in args.lengths.split(","))
    suffix = "" if args.precision == "q4" else f"-{args.precision}"
    args.work = (args.work or ROOT / "build" / f"scale-{args.shape}{suffix}").resolve()
    if args.stage:
        return run_stage(args)
    args.work.mkdir(parents=True, exist_ok=True)
    done = {
        "checkpoint": (args.work / "checkpoint" / "model.safetensors.index.json").exists(),
        "export": (args.work / MODEL / "decoder.json").exists(),
        "seal": (args.work / "bundle" / "manifest.json").exists(),
        "install": (args.work / "site" / "state" / "current").exists(),
    }
    out_path = args.out or ROOT / "bench" / "results" / (
        "scale.json" if args.shape == "1.5b" and not suffix else f"scale-{args.shape}{suffix}.json"
    )
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    stages = args.work / "stages.json"  # each build stage's measurement, kept with what it built
    result = {
        "shape": {"name": args.shape, **SHAPES[args.shape]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": args.threads,
                    "load_average_at_start": os.getloadavg(), "note": "stages run one after another"},
        "stages": json.loads(stages.read_text()) if stages.exists() else {},
    }  # fmt: skip
    prepare_site(args.work)
    if (args.ttft_probe or args.load_probe or args.reload_probe) and not (args.work / MODEL / "decoder.json").exists():
        p.error(f"nothing built in {args.work}: run the build first (e.g. --build-only)")
    if args.ttft_probe:  # the lengths asked for now (an earlier run may have written others)
        write_prompts(args.work)
    if args.load_probe:
        write_site_config(args.work, args.threads)
        model_bytes = weights_bytes(args.work)
        previous["load_memory"] = load_probe(args, model_bytes)
        out_path.write_text(json.dumps(previous, indent=2))
        print(json.dumps({k: v for k, v in previous["load_memory"].items() if k != "runs"}, indent=2))
        return 0
    if args.reload_probe:  # its own results file: scale-reload.json beside the build's
        model_bytes = weights_bytes(args.work)
        probe = reload_probe(args.work, args.threads, args.reload_probe, model_bytes)
        path = args.out or out_path.with_name(out_path.stem + "-reload.json")
        kept = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**kept, "reload_probe": probe}, indent=2) + "\n")
        print(json.dumps(probe, indent=2))
        return 0
    if args.ttft_probe:
        previous["ttft_probe"] = ttft_probe(args.work, args.threads, args.rounds)
        out_path.write_text(json.dumps(previous, indent=2))
        return 0
    for name in () if args.serve_only else ("checkpoint", "export", "seal", "install"):
        if not done[name] or name not in result["stages"]:
            result["stages"][name] = measured(name, args)
            stages.write_text(json.dumps(result["stages"], indent=2))
        out_path.write_text(json.dumps(result, indent=2))
    if args.build_only:
        return 0
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    result["bytes"] = {
        "checkpoint": size(args.work / "checkpoint"),
        "onnx_q4": size(args.work / MODEL),
        "bundle": size(args.work / "bundle"),
    }
    write_prompts(args.work)
    result["decrypt"] = measured("decrypt", args)
    result["daemon"] = serve(args.work, args.threads, args.rounds)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"[scale] daemon: {result['daemon']}", flush=True)
    result["load_memory"] = load_probe(args, weights_bytes(args.work))
    out_path.write_text(json.dumps(result, indent=2))
    if args.daemon_only:
        return 0
    result["in_process"] = measured("engine", args)
    out_path.write_text(json.dumps(result, indent=2))
    if args.serve_only:
        result.update({k: previous[k] for k in ("onnxruntime_genai_int4",) if k in previous})
    elif not args.no_genai:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            result["onnxruntime_genai"] = "not installed (pip install onnxruntime-genai==0.18.0)"
        else:
            if not (args.work / "genai-int4" / "genai_config.json").exists():
                result["stages"]["genai_build"] = measured("genai_build", args)
            result["onnxruntime_genai_int4"] = measured("genai", args)
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def run_stage(args: argparse.Namespace) -> int:
    work = args.work
    stages = {
        "checkpoint": lambda: stage_checkpoint(work, args.shape),
        "export": lambda: stage_export(work),
        "seal": lambda: stage_seal(work),
        "install": lambda: stage_install(work),
        "engine": lambda: stage_engine(work, args.threads, args.rounds),
        "decrypt": lambda: stage_decrypt(work),
        "load": lambda: stage_load(work, args.pieces),
        "genai_build": lambda: stage_genai_build(work),
        "genai": lambda: stage_genai(work, args.threads, args.rounds),
    }
    stages[args.stage]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
