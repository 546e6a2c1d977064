"""Tokenizers: the demo's byte-level BPE trained on the local corpus (no hub, no download), and the
special ids and companion files of any checkpoint's tokenizer (BOS or none, one EOS or several)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import ExportError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE; ids 0, 1, 2 are pad, bos and eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {
        "pad_token_id": tok.token_to_id(PAD),
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
    }


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Write ``tokenizer.json`` plus the config transformers' fast tokenizer loader expects."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": PAD,
                "bos_token": BOS,
                "eos_token": EOS,
                "model_max_length": 4096,
                "add_bos_token": True,  # the demo is trained with <|bos|> before every document
            },
            indent=2,
        )
    )


# What travels with a graph into the sealed model directory: the tokenizer, its config (special tokens and,
# for chat models, ``chat_template``) and a template kept beside it (newer checkpoints ship chat_template.jinja).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files ``src`` has into ``dst``; returns the names copied."""
    copied = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    for name in copied:
        shutil.copy(Path(src) / name, Path(dst) / name)
    return copied


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _adds_bos(tok: Tokenizer, tok_cfg: Mapping, bos: int) -> bool:
    """Whether the tokenizer puts ``bos`` before a text: ``add_bos_token`` when the config says, else what its
    post-processor does (transformers' rule: a named ``bos_token`` alone adds nothing)."""
    if "add_bos_token" in tok_cfg:
        return bool(tok_cfg["add_bos_token"])
    ids = tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


def special_token_ids(config: Mapping, generation: Mapping | None = None, tokenizer_dir: Path | None = None) -> dict:
    """``pad_token_id``, ``bos_token_id`` (None when prompts start without one), ``eos_token_id`` and
    ``eos_token_ids`` of a checkpoint, from its config.json, generation_config.json and tokenizer.

    The tokenizer decides the BOS: Qwen2's config names a ``bos_token_id`` its tokenizer never adds
    (``bos_token`` is null), DeepSeek-R1-Distill-Qwen's config names a different id than the
    ``<｜begin▁of▁sentence｜>`` its tokenizer adds, and SmolLM2 names ``<|im_start|>`` as ``bos_token`` but
    never adds it (``add_bos_token``, else the tokenizer's post-processor, decides). Every end id counts:
    generation_config.json lists several (``<|im_end|>`` and ``<|endoftext|>``) where config.json names one.
    """
    generation = generation or {}
    bos = generation.get("bos_token_id", config.get("bos_token_id"))
    eos = _ids(generation.get("eos_token_id")) + _ids(config.get("eos_token_id"))
    tok_cfg_path = Path(tokenizer_dir) / "tokenizer_config.json" if tokenizer_dir else None
    if tok_cfg_path is not None and tok_cfg_path.is_file() and (tok_cfg_path.parent / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
        tok = Tokenizer.from_file(str(tok_cfg_path.parent / "tokenizer.json"))
        bos_text, eos_text = _token_text(tok_cfg.get("bos_token")), _token_text(tok_cfg.get("eos_token"))
        bos = tok.token_to_id(bos_text) if bos_text else None
        if bos is not None and not _adds_bos(tok, tok_cfg, bos):
            bos = None  # named for the chat template, never prepended (SmolLM2's <|im_start|>)
        if eos_text and tok.token_to_id(eos_text) is not None:
            eos.append(tok.token_to_id(eos_text))
    if not eos:
        raise ExportError("the checkpoint names no end-of-sequence token (eos_token_id in config.json)")
    eos = list(dict.fromkeys(eos))
    pad = config.get("pad_token_id", generation.get("pad_token_id"))
    return {
        "pad_token_id": int(pad if pad is not None else eos[0]),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos[0],
        "eos_token_ids": tuple(eos),
    }


def checkpoint_special_ids(checkpoint_dir: Path) -> dict:
    """``special_token_ids`` of a checkpoint directory (config.json, generation_config.json, tokenizer)."""

    def read(name: str) -> dict:
        path = Path(checkpoint_dir) / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    return special_token_ids(read("config.json"), read("generation_config.json"), Path(checkpoint_dir))
