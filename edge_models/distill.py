"""Knowledge distillation: a pruned student learns the teacher's next-token distributions.

loss = alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · cross-entropy(labels), with
AdamW, linear warm-up and cosine decay, gradient accumulation, held-out evaluation at intervals
with early stopping, checkpoints every ``save_every`` steps and ``resume``. Runs on CPU or CUDA
with the same code; deterministic for a given seed and device.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .train import TrainConfig, lr_at


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    # Measured on the demo (bench/compression.py): with a teacher that is itself far from converged,
    # an even mix of teacher and labels at T=1 beat both alpha=0.9/T=2 and plain fine-tuning.
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the teacher term; 0 = plain fine-tuning on labels
    eval_every: int = 50
    patience: int = 4  # evaluations without improvement before stopping
    save_every: int = 100
    seed: int = 0
    device: str = "cpu"


def distill_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, vocab), labels.reshape(-1))
    if alpha == 0.0 or teacher_logits is None:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits.reshape(-1, vocab) / t, -1),
        F.log_softmax(teacher_logits.reshape(-1, vocab) / t, -1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * t * t * kl + (1 - alpha) * ce


def heldout_loss(model, windows: np.ndarray, device: str, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (its exp is the perplexity)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = torch.from_numpy(windows[i : i + batch_size]).to(device)
            logits = model(input_ids=batch[:, :-1]).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += batch[:, 1:].numel()
    return total / count


def distill(
    student,
    teacher,
    train: np.ndarray,
    heldout: np.ndarray,
    cfg: DistillConfig,
    out_dir: Path | None = None,
    resume: bool = False,
    run_steps: int | None = None,
    desc: str = "distill",
) -> dict:
    """Train ``student`` in place; returns a history (losses, evaluations, best step, stop reason).

    ``teacher`` may be None (plain cross-entropy fine-tuning, for comparison arms). ``run_steps``
    time-boxes this invocation: it checkpoints and pauses after that many steps, and a later call
    with ``resume=True`` continues exactly where it stopped (same batches, same schedule).
    """
    import torch

    torch.manual_seed(cfg.seed)
    device = cfg.device
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    schedule = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup)
    history = {"config": asdict(cfg), "train_loss": [], "evals": [], "stopped": "steps"}
    start, best, bad_evals, best_state = 0, math.inf, 0, None
    rng = np.random.default_rng(cfg.seed)
    ckpt = out_dir / "distill-checkpoint.pt" if out_dir else None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, history, best, bad_evals = state["step"], state["history"], state["best"], state["bad_evals"]
        best_state = state.get("best_state")
        rng.bit_generator.state = state["rng"]  # the same batches as an uninterrupted run
    bar = tqdm(range(start, cfg.steps), desc=desc, unit="step", initial=start, total=cfg.steps)
    for step in bar:
        student.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.grad_accum):
            batch = torch.from_numpy(train[rng.integers(0, len(train), cfg.batch_size)]).to(device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            with torch.no_grad():
                t_logits = teacher(input_ids=inputs).logits if teacher is not None and cfg.alpha > 0 else None
            loss = distill_loss(student(input_ids=inputs).logits, t_logits, labels, cfg.temperature, cfg.alpha)
            (loss / cfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        history["train_loss"].append(loss.item())
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            value = heldout_loss(student, heldout, device)
            history["evals"].append({"step": done, "heldout_loss": value, "perplexity": math.exp(value)})
            if value < best - 1e-4:
                best, bad_evals = value, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                bad_evals += 1
                if bad_evals >= cfg.patience:
                    history["stopped"] = f"early stop at step {done}: no improvement in {cfg.patience} evaluations"
                    break
        pause = run_steps is not None and done - start >= run_steps and done < cfg.steps
        if ckpt is not None and (done % cfg.save_every == 0 or pause):
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": student.state_dict(),
                    "optim": opt.state_dict(),
                    "step": done,
                    "history": history,
                    "best": best,
                    "bad_evals": bad_evals,
                    "best_state": best_state,
                    "rng": rng.bit_generator.state,
                },
                ckpt,
            )
        if pause:
            history["stopped"] = f"paused after step {done}"
            return history
    if best_state is not None:
        student.load_state_dict(best_state)
    history["best_heldout_loss"] = best
    student.eval()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "distill-history.json").write_text(json.dumps(history, indent=2))
    return history
