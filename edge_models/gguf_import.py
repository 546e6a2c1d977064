"""GGUF files in: the weights, the tokenizer, its special tokens and the chat template, rebuilt exactly from the
file's own metadata (the format llama.cpp, Ollama and LM Studio use; what sites already carry).

``GgufCheckpoint(path)`` gives what ``fused_graph.build_fused_decoder`` takes from a Hugging Face checkpoint: a
transformers config, tensor-by-tensor ``Weights`` under the Hugging Face names (llama.cpp's Q/K row permutation
for Llama undone) and the special ids; ``save_tokenizer(out_dir)`` writes ``tokenizer.json`` and
``tokenizer_config.json`` (with the chat template) for the runtime.

Blocks whose grid ``MatMulNBits`` reproduces bit for bit are carried over without requantization:
``Q8_0`` (8 bits, symmetric, zero point 128) and ``Q4_0`` (4 bits, symmetric, zero point 8), each in blocks of 32
with one scale. ``Q4_1`` and ``Q4_K`` blocks have a *float* minimum: ONNX Runtime 1.32 accepts float zero points but
runs them by dequantizing the whole matrix on every call (80x slower than integer zero points, measured in
docs/ARCHITECTURE.md), so those, and every other type, are dequantized to fp32 and quantized by our own method.

Supported: architectures ``llama`` and ``qwen2`` (DeepSeek-R1-Distill-Llama/-Qwen), byte-level BPE tokenizers
(``tokenizer.ggml.model = gpt2``) with the pre-tokenizers listed in ``PRE_TOKENIZERS``. Anything else is refused
with one line naming what and why.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .block_quant import Packed
from .errors import ExportError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes as the original tokenizer.json files write them (llama.cpp's llama-vocab.cpp keeps
# adapted copies of the same expressions under these ``tokenizer.ggml.pre`` names).
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# DeepSeek-V3/R1: digits in threes, CJK runs, then words and punctuation (three isolated splits, in this order)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^"""
    + "\r\n"
    + r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+["
    + "\r\n"
    + r"]*|\s*["
    + "\r\n"
    + r"]+|\s+(?!\S)|\s+",
)
PRE_TOKENIZERS = {
    "deepseek-v3": ("splits", _DEEPSEEK_V3),
    "qwen2": ("split", _QWEN2),
    "deepseek-r1-qwen": ("split", _QWEN2),
    "llama3": ("split", _LLAMA3),
    "llama-v3": ("split", _LLAMA3),
    "llama-bpe": ("split", _LLAMA3),
    "smollm": ("digits", None),
    "gpt-2": ("gpt2", None),
}
# Tokens that end a generation when the file has them as control tokens (llama.cpp's end-of-generation set).
END_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<｜end▁of▁sentence｜>", "<|end_of_text|>")

_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GgufError(ExportError):
    """A GGUF file this importer cannot use (architecture, tokenizer or tensor type), said in one line."""


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_PARTS:
        return f"model.layers.{parts[1]}.{_LAYER_PARTS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


class GgufCheckpoint:
    """A GGUF file opened for export: ``config``, ``weights``, ``special`` ids, ``exact(name, bits)`` blocks."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:
            raise GgufError("GGUF import needs the 'gguf' package (pip install edge-appliance[build])") from None
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise GgufError(f"{self.path.name} is not a readable GGUF file ({exc})") from None
        self._gguf = gguf
        self._tokenizer = None
        self.arch = self._field("general.architecture")
        if self.arch not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise GgufError(f"{self.path.name}: architecture {self.arch!r} is not supported (GGUF import: {supported})")
        self.tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None and t.name != "rope_freqs.weight":
                raise GgufError(f"{self.path.name}: tensor {t.name!r} has no place in a {self.arch} decoder")
            self.tensors[name or t.name] = t
        self.config = self._config()
        self.special, self.tokenizer_config = self._special()

    # -- metadata ---------------------------------------------------------------------------------------------------
    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _hparam(self, key: str, default=None):
        value = self._field(f"{self.arch}.{key}", default)
        if value is None:
            raise GgufError(f"{self.path.name}: metadata {self.arch}.{key} is missing; the file is incomplete")
        return value

    def _config(self):
        from transformers import LlamaConfig, Qwen2Config

        heads = int(self._hparam("attention.head_count"))
        hidden = int(self._hparam("embedding_length"))
        tokens = self._field("tokenizer.ggml.tokens") or []
        kwargs = dict(
            vocab_size=int(self._field(f"{self.arch}.vocab_size", len(tokens)) or len(tokens)),
            hidden_size=hidden,
            intermediate_size=int(self._hparam("feed_forward_length")),
            num_hidden_layers=int(self._hparam("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(self._hparam("attention.head_count_kv", heads)),
            rms_norm_eps=float(self._hparam("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(self._hparam("context_length")),
            tie_word_embeddings="lm_head.weight" not in self.tensors,
            rope_theta=float(self._hparam("rope.freq_base", 10000.0)),
        )
        scaling = self._field(f"{self.arch}.rope.scaling.type")
        if scaling not in (None, "none") or "rope_freqs.weight" in self.tensors:
            raise GgufError(
                f"{self.path.name}: rope scaling ({scaling or 'rope_freqs'}) is not supported by GGUF import"
            )
        if self.arch == "llama":
            head_dim = int(self._field("llama.rope.dimension_count", hidden // heads))
            config = LlamaConfig(head_dim=head_dim, architectures=["LlamaForCausalLM"], **kwargs)
        else:
            config = Qwen2Config(architectures=["Qwen2ForCausalLM"], **kwargs)
        config.rope_theta = kwargs["rope_theta"]
        return config

    def _special(self) -> tuple[dict, dict]:
        tokens = self._field("tokenizer.ggml.tokens")
        if not tokens:
            raise GgufError(f"{self.path.name} carries no tokenizer (tokenizer.ggml.tokens); it cannot be served")
        types = self._field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

        def token_id(key: str) -> int | None:
            value = self._field(f"tokenizer.ggml.{key}")
            return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

        bos, eos, pad = token_id("bos_token_id"), token_id("eos_token_id"), token_id("padding_token_id")
        add_bos = bool(self._field("tokenizer.ggml.add_bos_token", False)) and bos is not None
        ends = [i for i in (eos, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        ends += [i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == CONTROL and t in END_TEXTS]
        ends = list(dict.fromkeys(ends))
        if not ends:
            raise GgufError(f"{self.path.name} names no end-of-sequence token (tokenizer.ggml.eos_token_id)")
        special = {
            "pad_token_id": pad if pad is not None else ends[0],
            "bos_token_id": bos if add_bos else None,
            "eos_token_id": ends[0],
            "eos_token_ids": tuple(ends),
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokens[bos] if bos is not None else None,
            "eos_token": tokens[ends[0]],
            "pad_token": tokens[special["pad_token_id"]],
            "add_bos_token": add_bos,
            "add_eos_token": False,
            "model_max_length": int(self._hparam("context_length")),
        }
        template = self._field("tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        return special, config

    # -- tokenizer --------------------------------------------------------------------------------------------------
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` the file describes: vocabulary and merges as written, control tokens special,
        user-defined tokens added (not special), the original pre-tokenizer, BOS added only when the file says so.
        Built once (a 150k vocabulary takes about a second)."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    def _build_tokenizer(self):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        model = self._field("tokenizer.ggml.model")
        if model != "gpt2":
            raise GgufError(f"{self.path.name}: tokenizer model {model!r} is not supported (GGUF import: gpt2 BPE)")
        pre = self._field("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise GgufError(
                f"{self.path.name}: pre-tokenizer {pre!r} is not supported (GGUF import: {', '.join(PRE_TOKENIZERS)})"
            )
        tokens = self._field("tokenizer.ggml.tokens")
        types = self._field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        vocab: dict[str, int] = {}
        for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
            if kind != UNUSED:
                vocab.setdefault(text, i)
        merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges") or []]
        kind, pattern = PRE_TOKENIZERS[pre]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.startswith("llama")))
        if kind in ("split", "splits"):
            patterns = [pattern] if kind == "split" else list(pattern)
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        elif kind == "digits":
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        added = [
            AddedToken(text, special=kind == CONTROL, normalized=False)
            for text, kind in zip(tokens, types, strict=True)
            if kind in (CONTROL, USER_DEFINED)
        ]
        tok.add_special_tokens([a for a in added if a.special])
        tok.add_tokens([a for a in added if not a.special])
        bos = self.special["bos_token_id"]
        if bos is not None:
            text = tokens[bos]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{text} $A", pair=f"{text} $A {text} $B", special_tokens=[(text, bos)]
            )
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        for text, kind in zip(tokens, types, strict=True):
            if kind in (CONTROL, USER_DEFINED) and tok.token_to_id(text) != vocab.get(text):
                raise GgufError(f"{self.path.name}: token {text!r} did not keep its id; the vocabulary is inconsistent")
        return tok

    def save_tokenizer(self, out_dir: Path) -> list[str]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer().save(str(out_dir / "tokenizer.json"))
        (out_dir / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False))
        return ["tokenizer.json", "tokenizer_config.json"]

    # -- weights ----------------------------------------------------------------------------------------------------
    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """llama.cpp's converter permutes Llama's Q and K rows (interleaved rotary); the inverse order, else None."""
        if self.arch != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        heads = self.config.num_attention_heads if "q_proj" in name else self.config.num_key_value_heads
        order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
        return np.argsort(order)

    def get(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        qtype = self._gguf.GGMLQuantizationType
        try:
            if t.tensor_type == qtype.F32:
                values = np.asarray(t.data, np.float32)
            elif t.tensor_type == qtype.F16:
                values = np.asarray(t.data).astype(np.float32)
            else:
                values = self._gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            raise GgufError(
                f"{self.path.name}: tensor type {t.tensor_type.name} of {t.name} is not supported"
            ) from None
        values = values.reshape([int(d) for d in reversed(t.shape)]) if values.ndim != len(t.shape) else values
        order = self._row_order(name, values.shape[0])
        return np.array(values if order is None else values[order], np.float32)  # a copy: never the mapped file

    def exact(self, name: str, bits: int) -> Packed | None:
        """``name``'s blocks in ``MatMulNBits`` layout when the file's grid is exactly ``bits``-bit symmetric."""
        t = self.tensors.get(name)
        if t is None:
            return None
        qtype = self._gguf.GGMLQuantizationType
        raw = np.asarray(t.data, np.uint8)
        rows = raw.shape[0]
        if bits == 8 and t.tensor_type == qtype.Q8_0:
            blocks = raw.reshape(rows, -1, 34)
            scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
            packed = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        elif bits == 4 and t.tensor_type == qtype.Q4_0:
            blocks = raw.reshape(rows, -1, 18)
            scales = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
            qs = blocks[..., 2:]
            values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j low nibble, j+16 high nibble
            packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
        else:
            return None
        order = self._row_order(name, rows)
        if order is not None:
            packed, scales = packed[order], scales[order]
        return Packed(bits, int(t.shape[0]), np.ascontiguousarray(packed), np.ascontiguousarray(scales))

    def weights(self):
        from .fused_graph import Weights

        def shape(name: str) -> tuple[int, ...]:
            return tuple(int(d) for d in reversed(self.tensors[name].shape))

        return Weights(set(self.tensors) - {"rope_freqs.weight"}, shape, self.get, self.exact)

    def describe(self) -> str:
        from collections import Counter

        types = Counter(t.tensor_type.name for t in self.tensors.values())
        return f"{self.arch}, {self.config.num_hidden_layers} layers, tensors " + ", ".join(
            f"{n} {k}" for k, n in types.most_common()
        )
