"""One DeepSeek-V3 MoE layer's routed experts, per decode step: fused MoE / QMoE operator vs unrolled experts.

The layer has the 0.70 B MoE's shape (hidden 1024, 32 routed experts, top-6, moe_intermediate_size 512,
random weights): with 12 layers (the first dense, FFN 2816), MLA q_lora 384 / kv_lora 256, 2 shared
experts and vocab 32000 that is 0.697 B parameters (704 would make it 0.92 B).
Four graphs of the same weights, x [B,1,1024] → routed output:

- ``unrolled``: what ``export.py`` traces today (transformers' grouped-mm experts, one MatMul pair per expert);
- ``moe-fp32``, ``qmoe-q8``, ``qmoe-q4``: ``edge_models.fused_moe`` (one ``MoE``/``QMoE`` node).

Each graph is timed in its own fresh process with the same explicit thread count; rounds alternate the
order of the graphs; medians of the rounds are reported with every run, plus node counts and each
graph's error relative to transformers. Writes bench/results/moe_operator.json.

    .venv/bin/python bench/moe_operator.py [--threads 2] [--rounds 3] [--steps 300] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREFIX = "model.layers.1.mlp."
GRAPHS = ("unrolled", "moe-fp32", "qmoe-q8", "qmoe-q4")
BITS = {"moe-fp32": None, "qmoe-q8": 8, "qmoe-q4": 4}


def layer_config():
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        hidden_size=1024,
        moe_intermediate_size=512,
        n_routed_experts=32,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=1,
        topk_group=1,
    )
    config._experts_implementation = "grouped_mm"  # what a loaded model uses, and what export.py traces
    return config


def random_layer(config):
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    moe = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, 0.05 if name == "gate.weight" else 0.02)
        moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return moe


def export_unrolled(moe, path: Path) -> None:
    """The routed experts traced the way ``export.py`` traces a DeepSeek decoder."""
    import torch
    from transformers.exporters import exporter_onnx

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            _, weights, indices = self.moe.gate(x)
            return self.moe.experts(x.view(-1, x.shape[-1]), indices, weights).view(x.shape)

    translations = {
        torch.ops.transformers.grouped_mm_fallback.default: exporter_onnx._aten_grouped_mm,
        torch.ops.aten._grouped_mm.default: exporter_onnx._aten_grouped_mm,
    }
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        Routed(),
        (torch.randn(2, 3, moe.config.hidden_size),),
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: batch, 1: seq},),
        dynamo=True,
        custom_translation_table=translations,
        optimize=True,
        verbose=False,
    )
    program.save(str(path))


def build(workdir: Path) -> dict:
    """Write every graph and the reference input/output; returns node counts."""
    import numpy as np
    import onnx
    import torch

    from edge_models.fused_graph import Weights
    from edge_models.fused_moe import routed_experts_model

    config = layer_config()
    moe = random_layer(config)
    state = {PREFIX + k: v.detach().float().numpy() for k, v in moe.state_dict().items()}
    weights = Weights(set(state), lambda n: state[n].shape, lambda n: state[n])
    export_unrolled(moe, workdir / "unrolled.onnx")
    for name, bits in BITS.items():
        onnx.save_model(routed_experts_model(config, weights, PREFIX, bits), str(workdir / f"{name}.onnx"))
    x = np.random.default_rng(0).standard_normal((8, 1, config.hidden_size)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy(x)
        reference = (moe(t) - moe.shared_experts(t)).numpy()
    np.save(workdir / "x.npy", x)
    np.save(workdir / "reference.npy", reference)
    return {name: len(onnx.load(str(workdir / f"{name}.onnx"), load_external_data=False).graph.node) for name in GRAPHS}


def measure(graph: Path, threads: int, batch: int, steps: int) -> dict:
    """In this (fresh) process: median ms per decode step of ``graph`` at ``batch`` rows, and its error."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    x_all = np.load(graph.parent / "x.npy")
    reference = np.load(graph.parent / "reference.npy")[:batch]
    x = x_all[:batch]
    (y,) = session.run(None, {"x": x})
    error = float(np.linalg.norm(y - reference) / np.linalg.norm(reference))
    for _ in range(20):
        session.run(None, {"x": x})
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "relative_error": error}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every graph once (default: 3)")
    p.add_argument("--steps", type=int, default=300, help="timed decode steps per run (default: 300)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows per decode step (default: 1 8)")
    p.add_argument("--out", default="bench/results/moe_operator.json", help="results file")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: time one graph in this process
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.threads, args.batch[0], args.steps)))
        return 0
    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        nodes = build(workdir)
        runs = {b: {name: [] for name in GRAPHS} for b in args.batch}
        jobs = [(r, b) for r in range(args.rounds) for b in args.batch]
        for r, b in tqdm(jobs, desc="rounds × batch sizes"):
            order = GRAPHS[r % len(GRAPHS) :] + GRAPHS[: r % len(GRAPHS)]
            for name in order:
                cmd = [sys.executable, __file__, "--measure", str(workdir / f"{name}.onnx")]
                cmd += ["--threads", str(args.threads), "--batch", str(b), "--steps", str(args.steps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[b][name].append(json.loads(out.strip().splitlines()[-1]))
    results = {
        "what": "one DeepSeek-V3 MoE layer's routed experts (hidden 1024, 32 experts, top-6, inter 512), "
        "ms per decode step (S=1), each graph in its own process",
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_run": args.steps,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "node_counts": nodes,
        "batches": {
            str(b): {
                name: {
                    "median_ms": statistics.median(run["ms"] for run in runs[b][name]),
                    "runs_ms": [run["ms"] for run in runs[b][name]],
                    "relative_error": runs[b][name][0]["relative_error"],
                }
                for name in GRAPHS
            }
            for b in args.batch
        },
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for b in args.batch:
        base = results["batches"][str(b)]["unrolled"]["median_ms"]
        for name in GRAPHS:
            row = results["batches"][str(b)][name]
            print(
                f"batch {b:2d} {name:9s} {nodes[name]:4d} nodes  {row['median_ms']:7.3f} ms  "
                f"{base / row['median_ms']:5.2f}x unrolled  error {row['relative_error']:.2e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
