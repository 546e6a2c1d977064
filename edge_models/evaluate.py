"""Evaluate a student against its teacher: held-out perplexity, top-1 agreement, KL(teacher‖student),
distinct-n of sampled generations, parameter count and on-disk size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .prune import non_embedding_parameters


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams / total n-grams over all sequences (1.0 = never repeats itself)."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def compare(student, teacher, windows: np.ndarray, batch_size: int = 16) -> dict:
    """Perplexity of the student, and how closely it follows the teacher, on held-out windows."""
    import torch
    import torch.nn.functional as F

    student.eval()
    loss_sum = kl_sum = agree = count = 0.0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = torch.from_numpy(windows[i : i + batch_size])
            inputs, labels = batch[:, :-1], batch[:, 1:].reshape(-1)
            s = student(input_ids=inputs).logits.reshape(labels.numel(), -1)
            loss_sum += float(F.cross_entropy(s, labels, reduction="sum"))
            if teacher is not None:
                t = teacher(input_ids=inputs).logits.reshape(labels.numel(), -1)
                kl_sum += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum"))
                agree += float((s.argmax(-1) == t.argmax(-1)).sum())
            count += labels.numel()
    report = {"perplexity": math.exp(loss_sum / count), "tokens": int(count)}
    if teacher is not None:
        report.update(top1_agreement=agree / count, kl_teacher_student=kl_sum / count)
    return report


def sample_diversity(model, prompts: list[list[int]], new_tokens: int = 48, seed: int = 0) -> dict:
    import torch

    torch.manual_seed(seed)
    outs = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                input_ids=torch.tensor([p]),
                max_new_tokens=new_tokens,
                do_sample=True,
                temperature=0.8,
                top_k=50,
                pad_token_id=model.config.pad_token_id,
            )
            outs.append(out[0, len(p) :].tolist())
    return {"distinct_1": distinct_n(outs, 1), "distinct_2": distinct_n(outs, 2)}


def size_report(model, checkpoint_dir: Path | None = None) -> dict:
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": non_embedding_parameters(model),
    }
    if checkpoint_dir is not None:
        report["disk_bytes"] = sum(f.stat().st_size for f in Path(checkpoint_dir).glob("*.safetensors"))
    return report


def evaluate(
    student, teacher, heldout: np.ndarray, prompts: list[list[int]], checkpoint_dir: Path | None = None
) -> dict:
    return {
        **compare(student, teacher, heldout),
        **sample_diversity(student, prompts),
        **size_report(student, checkpoint_dir),
    }
