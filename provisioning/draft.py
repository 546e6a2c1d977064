"""The speculative-decoding draft model a bundle may carry (``draft/…`` payload files).

A draft is a second, smaller ONNX export that proposes tokens for the served model to check (docs/INFERENCE.md,
"Speculative decoding"). Its token ids must mean exactly what the target's mean, so the two tokenizers' vocabularies
(added tokens included) must be identical; the draft's embedding may have fewer padding rows than the target's.
Checked when sealing and again on the device before the draft is used.
"""

from __future__ import annotations

from .errors import BundleFormatError

DRAFT_PREFIX = "draft/"  # payload file ids of the draft: draft/model.onnx, draft/model.onnx.data, draft/decoder.json …


class DraftMismatchError(BundleFormatError):
    """The draft model's tokenizer is not the target's."""


def check_vocabularies(target: dict[str, int], draft: dict[str, int]) -> None:
    """Refuse a draft whose vocabulary (token text -> id, added tokens included) differs from the target's."""
    if target == draft:
        return
    differ = sorted(set(target.items()) ^ set(draft.items()), key=lambda kv: kv[1])
    text, token = differ[0]
    raise DraftMismatchError(
        f"the draft model's tokenizer differs from the target's ({len(draft)} vs {len(target)} tokens; "
        f"first difference: {text!r} = id {token}); seal a draft built with the target's tokenizer"
    )
