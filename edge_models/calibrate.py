"""Activation statistics for calibrated quantization: the mean squared input of every projection, per input
channel, over a calibration corpus (llama.cpp's "importance matrix", AWQ's activation scale).

Keys are the fused graph's tensor names (``layer{i}.qkv``, ``layer{i}.o``, ``layer{i}.gu``, ``layer{i}.down``,
``lm_head``), so ``fused_graph.build_fused_decoder(importance=...)`` weights each block's rounding error by how
strongly the channels it multiplies are driven on real text.
"""

from __future__ import annotations

import numpy as np

from .errors import EdgeModelsError

# Hugging Face module suffix → the fused graph tensor its input feeds
_TARGETS = {
    "self_attn.q_proj": "qkv",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gu",
    "mlp.down_proj": "down",
}


def model_from_weights(config, weights):
    """A transformers model of ``config`` holding ``weights`` (fp32), for calibration and reference logits."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # the weights are replaced at once: skip the random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for name in model.state_dict():
        if name in weights.names:
            state[name] = torch.from_numpy(weights.get(name))
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            raise EdgeModelsError(f"the weights have no tensor {name!r} for {type(model).__name__}")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def activation_importance(model, windows: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Mean squared input per channel of each projection over ``windows`` (``[n, seq]`` token ids)."""
    import torch

    if len(windows) == 0:
        raise EdgeModelsError("calibration needs at least one window of text")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(key: str):
        def record(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        return record

    for name, module in model.named_modules():
        key = None
        if name == "lm_head":
            key = "lm_head"
        elif name.startswith("model.layers."):
            parts = name.split(".")
            suffix = ".".join(parts[3:])
            if suffix in _TARGETS:
                key = f"layer{parts[2]}.{_TARGETS[suffix]}"
        if key is not None:
            hooks.append(module.register_forward_pre_hook(hook(key)))
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                model(input_ids=torch.from_numpy(np.asarray(windows[i : i + batch_size], np.int64)))
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).numpy().astype(np.float32) for k in sums}
