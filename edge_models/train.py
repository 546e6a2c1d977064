"""Language-model training and evaluation shared by the teacher build and later distillation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0


DEFAULT_TRAIN = TrainConfig()


def pack_windows(token_docs: list[list[int]], seq_len: int, stride: int | None = None) -> np.ndarray:
    """Concatenate tokenized documents and cut the stream into ``seq_len + 1`` windows (input + shifted
    target), one every ``stride`` tokens (default ``seq_len``: no overlap)."""
    stride = stride or seq_len
    stream = np.fromiter((t for doc in token_docs for t in doc), dtype=np.int64)
    starts = range(0, len(stream) - seq_len, stride)
    return np.stack([stream[s : s + seq_len + 1] for s in starts])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_causal_lm(model, windows: np.ndarray, cfg: TrainConfig, desc: str = "train") -> list[float]:
    """Train with next-token cross-entropy on random windows; returns the loss per step."""
    import torch

    gen = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    losses = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = torch.from_numpy(windows[gen.integers(0, len(windows), cfg.batch_size)])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def perplexity(model, windows: np.ndarray, batch_size: int = 16) -> float:
    """Token-level perplexity over all held-out windows."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            batch = torch.from_numpy(windows[i : i + batch_size])
            logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += batch[:, 1:].numel()
    return math.exp(total / count)
