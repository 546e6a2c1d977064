"""Training and calibration data: text files and JSONL → cleaning → token windows → leak-free split.

Inputs: ``.txt``/``.md`` files (one document per blank-line-separated section), and ``.jsonl``
files whose lines carry ``text`` or an ``input_text``/``target_text`` pair (joined by a newline).
No paths: the Python standard library's docstrings (``corpus.py``). A customer's maintenance
manuals and SOPs go through exactly this path for domain adaptation.

The held-out split is decided per *document* by a hash of its text, before windowing, so no
window of a held-out document is ever trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import build_corpus, clean_text, is_heldout
from .errors import EdgeModelsError
from .train import pack_windows


class DataError(EdgeModelsError):
    pass


def read_documents(paths: list[Path]) -> list[str]:
    docs: list[str] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            docs += read_documents(sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl")))
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}:{n}: not JSON ({exc})") from None
                if isinstance(item, dict) and isinstance(item.get("text"), str):
                    docs.append(item["text"])
                elif (
                    isinstance(item, dict)
                    and isinstance(item.get("input_text"), str)
                    and isinstance(item.get("target_text"), str)
                ):
                    docs.append(item["input_text"] + "\n" + item["target_text"])
                else:
                    raise DataError(f"{path}:{n}: expected a 'text' string or 'input_text'/'target_text' strings")
        else:
            docs += path.read_text(encoding="utf-8", errors="replace").split("\n\n\n")
    return docs


def clean(docs: list[str], min_chars: int = 20, max_chars: int = 200_000) -> list[str]:
    """Control characters out, exact repeats dropped (first kept), too short/long documents dropped."""
    seen: set[str] = set()
    out = []
    for doc in docs:
        doc = clean_text(doc)
        if min_chars <= len(doc) <= max_chars and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def encode_documents(tokenizer, docs: list[str], bos_id: int | None, eos_id: int | None) -> list[list[int]]:
    """Token ids of each document, framed by the ids that are not None; the tokenizer's own
    post-processor is bypassed so a BOS is never added twice."""
    head, tail = [t for t in (bos_id,) if t is not None], [t for t in (eos_id,) if t is not None]
    return [[*head, *e.ids, *tail] for e in tokenizer.encode_batch(docs, add_special_tokens=False)]


def corpus_windows(
    tokenizer, paths: list[Path], seq_len: int, bos_id: int | None = None, eos_id: int | None = None
) -> tuple[np.ndarray, int]:
    """Every document of ``paths`` (no held-out split: a site scoring a model on its own manuals wants
    all of them) as non-overlapping windows, and the corpus's token count. A corpus shorter than one
    window is scored as a single shorter window; otherwise the last partial window (< ``seq_len``
    tokens) is the only part not scored."""
    docs = clean(read_documents(paths))
    if not docs:
        raise DataError(f"no documents of at least 20 characters in {', '.join(map(str, paths))}")
    stream = [t for doc in encode_documents(tokenizer, docs, bos_id, eos_id) for t in doc]
    if len(stream) < 2:
        raise DataError("the corpus is shorter than two tokens; nothing to score")
    return pack_windows([stream], min(seq_len, len(stream) - 1)), len(stream)


@dataclass(frozen=True)
class Dataset:
    train: np.ndarray  # [N, seq_len + 1] sliding windows
    heldout: np.ndarray  # [M, seq_len + 1] non-overlapping windows
    stats: dict


def build_dataset(
    tokenizer,
    paths: list[Path] | None = None,
    seq_len: int = 512,
    stride: int = 128,
    heldout_percent: int = 5,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> Dataset:
    """Tokenize documents (``bos_id`` … ``eos_id`` each, either left out when None: Qwen-family
    tokenizers have no BOS) into training windows every ``stride`` tokens."""
    if paths:
        docs = clean(read_documents(paths))
        train_docs = [d for d in docs if not is_heldout(d, heldout_percent)]
        heldout_docs = [d for d in docs if is_heldout(d, heldout_percent)]
    else:
        corpus = build_corpus(heldout_percent=heldout_percent)
        train_docs, heldout_docs = corpus.train, corpus.heldout
    if not train_docs or not heldout_docs:
        raise DataError(
            f"need documents on both sides of the split; got {len(train_docs)} train, "
            f"{len(heldout_docs)} held-out (add data or raise --heldout-percent)"
        )
    train = pack_windows(encode_documents(tokenizer, train_docs, bos_id, eos_id), seq_len, stride)
    heldout = pack_windows(encode_documents(tokenizer, heldout_docs, bos_id, eos_id), seq_len)
    return Dataset(
        train,
        heldout,
        {
            "train_docs": len(train_docs),
            "heldout_docs": len(heldout_docs),
            "train_windows": len(train),
            "heldout_windows": len(heldout),
            "seq_len": seq_len,
            "stride": stride,
        },
    )
