"""GPU benchmark of the torch engine (``[engine] kind = "torch"``) against ``transformers.generate``.

Per model, in one run, on one device:

- **copy bandwidth**: device-to-device ``copy_`` of a 1 GiB tensor (bytes read + written per
  second): the practical ceiling a memory-bound decode step can approach;
- **engine, in process**: batch-1 decode tokens/s and bandwidth achieved (bytes of weights read
  per token × tokens/s, gpt-fast's measure) as a fraction of the copy bandwidth; TTFT (prefill of
  32 / 512 / 2048 prompt tokens to the first token's logits on the host);
- **transformers.generate** (same weights, same dtype, same device; static cache, greedy): batch-1
  decode tokens/s and TTFT at the same prompt lengths, rounds alternating with the engine's;
- **the daemon** (sealed bundle, installed, served over ZeroMQ with audit on): batch-1 tokens/s,
  TTFT at the same prompt lengths, aggregate tokens/s with 1 / 8 / 32 concurrent clients.

Models: the demo student (``--demo build/demo``: DeepSeek-V3 MLA+MoE) and a checkpoint of
DeepSeek-R1-Distill-Qwen-1.5B's shape (Qwen2, 28 layers, 1536 wide, vocab 151936) with random
bf16 weights, built on the machine (no hub). Results: ``bench/results/gpu.json`` with the GPU,
driver, CUDA, torch and transformers versions.

    python bench/gpu.py --demo build/demo                       # on the GPU machine
    python bench/gpu.py --device cpu --small --demo build/demo  # CPU smoke run (small shapes)
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
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from appliance.config import render_config  # noqa: E402
from appliance.engine.torch_engine import TorchEngine  # noqa: E402
from appliance.transport.client import Client  # noqa: E402
from bench.common import daemon  # noqa: E402

R1_DISTILL_1_5B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    rope_theta=10000.0,
)
SMALL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    vocab_size=8192,
    rope_theta=10000.0,
)
PROMPT_LENGTHS = (32, 512, 2048)
CLIENTS = (1, 8, 32)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` (each byte read once and written once)."""
    n = int(gib * (1 << 30)) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


# -- checkpoints -------------------------------------------------------------------------------
def word_tokenizer(vocab: int):
    """A word-level tokenizer over ``w0 .. w{vocab-1}``: a prompt of n words is exactly n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def build_distill_shape(out: Path, small: bool, device: str) -> Path:
    """A random checkpoint of the R1-Distill-Qwen-1.5B shape (``SMALL`` for the smoke run), built here."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from edge_models.export import decoder_spec

    if (out / "decoder.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    shape = SMALL if small else R1_DISTILL_1_5B
    cfg = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.pad_token_id = 0
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    model.save_pretrained(out)
    (out / "decoder.json").write_text(decoder_spec(model).to_json())
    word_tokenizer(shape["vocab_size"]).save(str(out / "tokenizer.json"))
    return out


def demo_checkpoint(demo: Path, out: Path) -> Path:
    """The demo student's checkpoint with the decoder.json and tokenizer the bundle carries."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(demo / "student" / "student" / f, out / f)
    for f in ("decoder.json", "tokenizer.json"):
        shutil.copy(demo / "student" / "onnx" / f, out / f)
    return out


def prompt_of(ckpt: Path, n: int) -> tuple[str, list[int]]:
    """A text that tokenizes to ``n`` ids with BOS prepended (as the daemon tokenizes it)."""
    from tokenizers import Tokenizer

    from appliance.engine import DecoderSpec

    spec = DecoderSpec.from_json((ckpt / "decoder.json").read_text())
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    base = "Return the number of bytes in the buffer and raise an error if the socket is closed. "
    ids = tok.encode(base * (n // 4 + 8)).ids[: n - 1]
    if len(set(ids)) <= 1:  # the random checkpoint's word-level tokenizer knows none of those words
        ids = list(range(10, 10 + n - 1))
    text = tok.decode(ids)
    return text, [spec.bos_token_id, *tok.encode(text).ids[: n - 1]]


def prompt_lengths(ckpt: Path, new: int) -> list[int]:
    """The prompt lengths of ``PROMPT_LENGTHS`` that fit the model's positions with ``new`` tokens."""
    from appliance.engine import DecoderSpec

    limit = DecoderSpec.from_json((ckpt / "decoder.json").read_text()).max_positions
    return [n for n in PROMPT_LENGTHS if n + new + 8 <= limit]


# -- in-process rounds -------------------------------------------------------------------------
def engine_round(engine: TorchEngine, ids: list[int], new: int) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) for one batch-1 request; the slot is released after."""
    start = time.perf_counter()
    logits = engine.prefill([(0, ids)])
    ttft = time.perf_counter() - start
    token = int(logits[0].argmax())
    start = time.perf_counter()
    for _ in range(new - 1):
        token = int(engine.decode([(0, token)])[0].argmax())
    rate = (new - 1) / (time.perf_counter() - start)
    engine.release(0)
    return ttft, rate


def hf_round(model, ids: list[int], new: int, device: str) -> tuple[float, float]:
    """transformers.generate (greedy, static cache): TTFT and decode tokens/s from the times its
    streamer hook sees each token (synchronized, as the engine's host-side logits are)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # called with the prompt, then once per new token
            sync(device)
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    x = torch.tensor([ids], device=device)
    sync(device)
    start = time.perf_counter()
    model.generate(
        x,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
        streamer=clock,
    )
    first, last = clock.times[1], clock.times[-1]
    return first - start, (new - 1) / (last - first)


def in_process(ckpt: Path, device: str, rounds: int, new: int, copy_bw: float, threads: int) -> dict:
    from transformers import AutoModelForCausalLM

    from appliance.engine import DecoderSpec

    spec = DecoderSpec.from_json((ckpt / "decoder.json").read_text())
    engine = TorchEngine(
        (ckpt / "model.safetensors").read_bytes(),
        (ckpt / "config.json").read_bytes(),
        spec,
        num_slots=1,
        max_seq_len=max(prompt_lengths(ckpt, new)) + new + 8,
        device=device,
        threads=threads,
    )
    dtype = engine.dtype
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    out: dict = {"weight_bytes_per_token": engine.weight_bytes, "dtype": str(dtype).removeprefix("torch.")}
    for n in prompt_lengths(ckpt, new):
        _, ids = prompt_of(ckpt, n)
        engine_round(engine, ids, 4)
        hf_round(hf, ids, 4, device)  # warm-ups (graph capture, static cache allocation)
        e, h = [], []
        for _ in range(rounds):  # alternate so machine noise hits both alike
            e.append(engine_round(engine, ids, new))
            h.append(hf_round(hf, ids, new, device))
        out[f"prompt_{n}"] = {
            "engine_ttft_ms": 1000 * statistics.median(t for t, _ in e),
            "transformers_ttft_ms": 1000 * statistics.median(t for t, _ in h),
            "engine_tokens_per_s": statistics.median(r for _, r in e),
            "transformers_tokens_per_s": statistics.median(r for _, r in h),
        }
    b1 = out[f"prompt_{PROMPT_LENGTHS[0]}"]
    out["engine_bandwidth_gb_s"] = engine.weight_bytes * b1["engine_tokens_per_s"] / 1e9
    out["engine_fraction_of_copy_bandwidth"] = out["engine_bandwidth_gb_s"] * 1e9 / copy_bw
    out["transformers_bandwidth_gb_s"] = engine.weight_bytes * b1["transformers_tokens_per_s"] / 1e9
    out["speedup_vs_transformers"] = b1["engine_tokens_per_s"] / b1["transformers_tokens_per_s"]
    del engine, hf
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# -- the daemon --------------------------------------------------------------------------------
def provision(ckpt: Path, site: Path, max_batch: int, max_seq_len: int, threads: int) -> Path:
    """Vendor key, device identity, a sealed bundle of the checkpoint (torch engine), installed."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from provisioning.bundle import seal
    from provisioning.keys import VENDOR_SIGNING, DeviceIdentity, load_ed25519

    shutil.rmtree(site, ignore_errors=True)  # a fresh device each run
    site.mkdir(parents=True)
    exe = Path(sys.executable).parent
    run = lambda *a: subprocess.run([str(exe / a[0]), *a[1:]], check=True, stdout=subprocess.DEVNULL)  # noqa: E731
    run("edge-provision", "keygen", "--vendor", str(site / "vendor"))
    run("edge-provision", "enroll", "--keys", str(site / "keys"), "--out", str(site / "id.json"), "--device-id", "b")
    (site / "trust").mkdir()
    shutil.copy(site / "vendor" / "vendor-ed25519.pub", site / "trust" / "vendor.pub")
    files = {f: ckpt / f for f in ("model.safetensors", "config.json", "decoder.json", "tokenizer.json")}
    recipient = X25519PublicKey.from_public_bytes(DeviceIdentity.load(site / "id.json").x25519)
    seal(
        files,
        site / "bundle",
        model_id=ckpt.name,
        version=1,
        architecture=json.loads((ckpt / "decoder.json").read_text())["architecture"],
        engines=None,
        signing_key=load_ed25519(VENDOR_SIGNING, site / "vendor"),
        recipients=[recipient],
    )
    run("edge-provision", "install", str(site / "bundle"), "--state", str(site / "state"), "--trust",
        str(site / "trust"), "--keys", str(site / "keys"))  # fmt: skip
    config = site / "appliance.toml"
    text = render_config("state", "trust", "keys", "audit.db", max_batch=max_batch)
    text = text.replace("max_seq_len = 512 ", f"max_seq_len = {max_seq_len} ").replace(
        "threads = 0 ", f"threads = {threads} "
    )
    config.write_text(text.replace("max_new_tokens = 256 ", f"max_new_tokens = {max_seq_len} "))
    return config


def stream(client: Client, prompt: str, new: int) -> tuple[float, float, int]:
    """(TTFT s, tokens/s after the first, tokens) of one streamed request, timed on the client."""
    start = time.perf_counter()
    first = None
    for event in client.generate(prompt, max_tokens=new, ignore_eos=True):
        first = first or time.perf_counter()
        final = event
    done = time.perf_counter()
    n = final["usage"]["completion_tokens"]
    return first - start, (n - 1) / max(done - first, 1e-9), n


def load(endpoint: str, prompt: str, clients: int, new: int) -> float:
    """Aggregate tokens/s with ``clients`` concurrent streaming requests (2 each)."""
    total = [0]
    lock = threading.Lock()

    def worker() -> None:
        with Client(endpoint, timeout_s=600) as c:
            for _ in range(2):
                n = stream(c, prompt, new)[2]
                with lock:
                    total[0] += n

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0] / (time.perf_counter() - start)


def served(ckpt: Path, site: Path, rounds: int, new: int, threads: int) -> dict:
    lengths = prompt_lengths(ckpt, new)
    config = provision(ckpt, site, max_batch=max(CLIENTS), max_seq_len=max(lengths) + new + 8, threads=threads)
    out: dict = {}
    with daemon(config, name="gpu") as endpoint, Client(endpoint, timeout_s=600) as client:
        out["engine"] = client.call("info").get("engine")
        for n in lengths:
            prompt, _ = prompt_of(ckpt, n)
            stream(client, prompt, 4)
            runs = [stream(client, prompt, new) for _ in range(rounds)]
            out[f"prompt_{n}"] = {
                "ttft_ms": 1000 * statistics.median(t for t, _, _ in runs),
                "tokens_per_s": statistics.median(r for _, r, _ in runs),
            }
        prompt, _ = prompt_of(ckpt, PROMPT_LENGTHS[0])
        load(endpoint, prompt, max(CLIENTS), 8)  # warm-up: captures the decode graphs of every batch size
        out["aggregate_tokens_per_s"] = {str(c): load(endpoint, prompt, c, new) for c in CLIENTS}
    return out


def environment(device: str) -> dict:
    import transformers

    env = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as exc:
            env["driver"] = f"unknown ({exc})"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to run (default: cuda)")
    p.add_argument("--small", action="store_true", help="small shapes and few rounds: a smoke run, not a result")
    p.add_argument("--demo", type=Path, help="demo build directory (edge-models demo --out DIR); skipped if absent")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per point (default: 5)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default: 128)")
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads for both runtimes (default: 1 with --device cpu)"
    )
    p.add_argument("--work", type=Path, help="scratch directory (default: a fresh temporary one)")
    p.add_argument(
        "--out", type=Path, help="results JSON (default: bench/results/gpu.json; with --small gpu_<device>_smoke.json)"
    )
    args = p.parse_args(argv)
    results = ROOT / "bench" / "results"
    args.out = args.out or results / (f"gpu_{args.device}_smoke.json" if args.small else "gpu.json")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU visible; run with --device cpu --small for a smoke run", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the daemon must pick the CPU too
    threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)  # the same explicit count for the engine and transformers
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rounds, new = (2, 16) if args.small else (args.rounds, args.new_tokens)
    result = {"environment": environment(args.device), "small": args.small, "rounds": rounds, "new_tokens": new}
    result["threads"] = threads
    result["copy_bandwidth_gb_s"] = copy_bandwidth(args.device, 0.25 if args.small else 1.0) / 1e9
    print(f"device-to-device copy: {result['copy_bandwidth_gb_s']:.1f} GB/s", flush=True)
    models = {"r1-distill-qwen-1.5b-shape" + ("-small" if args.small else ""): None}
    if args.demo and (args.demo / "student" / "student" / "model.safetensors").exists():
        models["demo-student"] = args.demo
    result["models"] = {}
    for name, demo in models.items():
        ckpt = demo_checkpoint(demo, work / name) if demo else build_distill_shape(work / name, args.small, args.device)
        print(f"[{name}] engine vs transformers.generate, in process", flush=True)
        entry = {"in_process": in_process(ckpt, args.device, rounds, new, result["copy_bandwidth_gb_s"] * 1e9, threads)}
        print(f"[{name}] daemon", flush=True)
        entry["daemon"] = served(ckpt, work / f"site-{name}", rounds, new, threads)
        result["models"][name] = entry
        print(json.dumps(entry, indent=2), flush=True)
    if args.demo is None or "demo-student" not in result["models"]:
        result["skipped"] = "demo student: pass --demo build/demo (built by edge-models demo)"
    result["note"] = "shared machine" if args.device == "cpu" else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
