"""Does distillation earn its keep? Five arms on the demo teacher, same data, same step budget.

1. the teacher; 2. the pruned student untrained; 3. pruned + distilled (the product);
4. pruned + plain cross-entropy fine-tuning (no teacher); 5. the student's shape trained from
random initialisation. Reports held-out perplexity and non-embedding parameters; writes
bench/results/compression.json.

    .venv/bin/python bench/compression.py --teacher build/demo/teacher [--target 0.5] [--steps 300]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_models.compress import calibration_batches, load_checkpoint  # noqa: E402
from edge_models.data import build_dataset  # noqa: E402
from edge_models.distill import DistillConfig, distill, heldout_loss  # noqa: E402
from edge_models.prune import measure_importance, non_embedding_parameters, prune, target_for_budget  # noqa: E402
from edge_models.tokenizer import checkpoint_special_ids  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="build/demo/teacher", help="teacher checkpoint (default: the demo's)")
    p.add_argument("--target", type=float, default=0.5, help="fraction of non-embedding parameters kept (0.5)")
    p.add_argument("--steps", type=int, default=300, help="training steps per trained arm (default: 300)")
    p.add_argument("--out", default="bench/results/compression.json", help="results file")
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    teacher, tok = load_checkpoint(Path(args.teacher))
    special = checkpoint_special_ids(Path(args.teacher))
    ds = build_dataset(tok, seq_len=128, stride=64, bos_id=special["bos_token_id"], eos_id=special["eos_token_id"])
    heldout = ds.heldout
    target = target_for_budget(teacher, args.target)
    pruned = prune(teacher, measure_importance(teacher, calibration_batches(ds.train)), target)
    base = DistillConfig(steps=args.steps, batch_size=16, eval_every=50, patience=100)
    arms = {"1 teacher": (teacher, None), "2 pruned, untrained": (pruned, None)}
    results = {}
    for name, (model, _) in arms.items():
        results[name] = {
            "perplexity": math.exp(heldout_loss(model, heldout, "cpu")),
            "non_embedding_parameters": non_embedding_parameters(model),
            "seconds": 0.0,
        }
    torch.manual_seed(0)
    scratch = AutoModelForCausalLM.from_config(copy.deepcopy(pruned.config))
    trained = {
        "3 pruned + distilled": (copy.deepcopy(pruned), teacher, base),
        "4 pruned + cross-entropy fine-tuning": (
            copy.deepcopy(pruned),
            None,
            DistillConfig(**{**base.__dict__, "alpha": 0.0}),
        ),
        "5 same shape from random init": (scratch, None, DistillConfig(**{**base.__dict__, "alpha": 0.0, "lr": 3e-3})),
    }
    for name, (student, t, cfg) in trained.items():
        start = time.monotonic()
        distill(student, t, ds.train, heldout, cfg, desc=name)
        results[name] = {
            "perplexity": math.exp(heldout_loss(student, heldout, "cpu")),
            "non_embedding_parameters": non_embedding_parameters(student),
            "seconds": round(time.monotonic() - start, 1),
        }
    t_ppl, t_par = results["1 teacher"]["perplexity"], results["1 teacher"]["non_embedding_parameters"]
    for r in results.values():
        r["perplexity_ratio"] = r["perplexity"] / t_ppl
        r["parameter_fraction"] = r["non_embedding_parameters"] / t_par
    product = results["3 pruned + distilled"]
    finetuned, scratch_arm = results["4 pruned + cross-entropy fine-tuning"], results["5 same shape from random init"]
    verdict = {
        "target_fraction_met": product["parameter_fraction"] <= 0.55,
        "target_perplexity_met": product["perplexity_ratio"] <= 1.15,
        "beats_finetuning": product["perplexity"] < finetuned["perplexity"],
        "beats_scratch": product["perplexity"] < scratch_arm["perplexity"],
    }
    out = {"prune_target": target.__dict__, "steps_per_arm": args.steps, "arms": results, "verdict": verdict}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{'arm':40} {'params':>10} {'fraction':>8} {'perplexity':>10} {'x teacher':>9}")
    for name, r in results.items():
        print(
            f"{name:40} {r['non_embedding_parameters']:>10,} {r['parameter_fraction']:>8.2f} "
            f"{r['perplexity']:>10.2f} {r['perplexity_ratio']:>9.2f}"
        )
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
