"""``decoder.json``: what the runtime must know about an exported decoder graph.

Written by ``edge_models.export`` next to ``model.onnx`` and sealed into the bundle with it.
Traced graphs (``cache: "concat"``) take ``input_ids [B,S]``, ``attention_mask [B,P+S]``, ``position_ids [B,S]`` and per
layer ``past.i.key [B,Hk,P,Dk]`` / ``past.i.value [B,Hv,P,Dv]``; outputs ``logits [B,S,V]`` and
``present.i.key`` / ``present.i.value`` with ``P+S`` positions. Fused graphs (``cache: "static"``)
take ``input_ids``, ``seqlens_k [B]``, ``total_sequence_length`` and the fixed-size cache buffers,
which they update in place (see ``edge_models.fused_graph``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from appliance.errors import ApplianceError

DECODER_FORMAT = 1


class SpecError(ApplianceError):
    """A decoder.json this software cannot use."""


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")
    ]


def static_input_names(num_layers: int) -> list[str]:
    """Inputs of a static-cache graph (``edge_models.fused_graph``): the cache is read and written in place."""
    return ["input_ids", "seqlens_k", "total_sequence_length"] + [
        f"past.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")
    ]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    num_layers: int
    key_shape: tuple[int, int]  # (heads, dim) of each cached key tensor
    value_shape: tuple[int, int]
    vocab_size: int
    max_positions: int
    pad_token_id: int
    bos_token_id: int | None  # None: the tokenizer has no BOS (Qwen family); prompts start without one
    eos_token_id: int  # the primary end-of-sequence id
    weight_bytes: int = 0  # bytes of weights read per decode step (for bandwidth accounting)
    # "concat": past in, past+new out (export.py's traced graphs); "static": one [rows, H, max_seq_len, D]
    # buffer per tensor, written in place at each row's length (fused_graph.py)
    cache: str = "concat"
    format: int = DECODER_FORMAT
    # Every id that ends generation (generation_config.json lists several, e.g. <|im_end|> and <|endoftext|>);
    # always starts with ``eos_token_id``, so a decoder.json written before this field still loads.
    eos_token_ids: tuple[int, ...] = ()
    # Static caches only: the graph's value IS its key (DeepSeek's absorbed MLA caches one latent+rotary tensor),
    # so one buffer per layer is bound to past/present key and value alike, and a saved session holds it once.
    value_is_key: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(dict.fromkeys((self.eos_token_id, *self.eos_token_ids))))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DecoderSpec:
        """Parse a decoder.json; anything malformed is a ``SpecError`` naming what is wrong."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SpecError(f"decoder.json is not JSON ({exc}); re-export the model") from None
        if not isinstance(data, dict):
            raise SpecError("decoder.json is not a JSON object; re-export the model")
        if data.get("format") != DECODER_FORMAT:
            raise SpecError(f"decoder.json format {data.get('format')!r} is not supported (expected {DECODER_FORMAT})")
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise SpecError(
                f"decoder.json has unknown fields {sorted(set(data) - known)}; it is newer than this software"
            )
        try:
            data["key_shape"] = tuple(data["key_shape"])
            data["value_shape"] = tuple(data["value_shape"])
            data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"decoder.json is incomplete or malformed ({exc}); re-export the model") from None
