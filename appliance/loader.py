"""Load the installed model: verify the bundle, unwrap its key, decrypt into memory, build the engine.

Nothing decrypted touches the disk. The data key lives in a bytearray that is overwritten as soon
as the payload is decrypted; the plaintext model buffer, and the one ``bytes`` copy ONNX Runtime
needs, are overwritten once the engine is built (the engine drops its own references to them).
(Best effort: copies inside OpenSSL, ONNX Runtime or Python's allocator are beyond reach.)
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from appliance.config import Config
from appliance.engine import DecoderSpec, Engine, create_engine
from appliance.errors import ApplianceError
from appliance.serving.chat import ChatTemplate
from provisioning.bundle import Bundle
from provisioning.install import current_bundle
from provisioning.keys import DEVICE_X25519, load_trusted_vendors, load_x25519, wipe

MODEL_FILE, SPEC_FILE, TOKENIZER_FILE = "model.onnx", "decoder.json", "tokenizer.json"
EXTERNAL_DATA_FILE = "model.onnx.data"  # weights of models past the 2 GB protobuf limit
# Optional: the tokenizer's config (special tokens, ``chat_template``) and a template file beside it.
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")


class ModelLoadError(ApplianceError):
    pass


@dataclass
class LoadedModel:
    model_id: str
    version: int
    bundle_id: str
    engine: Engine
    tokenizer: Tokenizer
    spec: DecoderSpec
    chat: ChatTemplate | None = None  # the checkpoint's chat template; None: ``messages`` are refused


def installed_bundle(config: Config) -> Bundle:
    bundle = current_bundle(config.state_dir, load_trusted_vendors(config.trust_dir))
    if bundle is None:
        raise ModelLoadError(
            f"no model installed under {config.state_dir}; install one with 'edge-provision install BUNDLE --state DIR'"
        )
    return bundle


def load_model(config: Config) -> LoadedModel:
    bundle = installed_bundle(config)
    device_key = load_x25519(DEVICE_X25519, config.key_dir)
    data_key = bundle.unwrap_key(device_key)
    del device_key
    external: dict[str, bytearray] = {}
    try:
        model = bundle.decrypt_into(MODEL_FILE, data_key)
        if any(f.id == EXTERNAL_DATA_FILE for f in bundle.files()):
            external[EXTERNAL_DATA_FILE] = bundle.decrypt_into(EXTERNAL_DATA_FILE, data_key)
        spec = DecoderSpec.from_json(bytes(bundle.decrypt_into(SPEC_FILE, data_key)))
        tokenizer = Tokenizer.from_str(bundle.decrypt_into(TOKENIZER_FILE, data_key).decode("utf-8"))
        present = {f.id for f in bundle.files()}
        chat = ChatTemplate.from_files(
            *(bytes(bundle.decrypt_into(f, data_key)) if f in present else None for f in CHAT_FILES)
        )
    finally:
        wipe(data_key)
    model_bytes = bytes(model)  # ONNX Runtime takes only bytes: this copy is ours, wiped below
    wipe(model)
    try:
        engine = create_engine(
            config.engine.kind,
            model_bytes,
            spec,
            num_slots=config.engine.max_batch,
            max_seq_len=config.engine.max_seq_len,
            threads=config.engine.threads,
            external=external,
            spin=config.engine.spin,
            affinity=config.engine.affinity,
        )
    finally:
        wipe(model_bytes)
        del model_bytes
        for buf in external.values():
            wipe(buf)
    return LoadedModel(
        model_id=bundle.model_id,
        version=bundle.version,
        bundle_id=bundle.manifest["bundle_id"],
        engine=engine,
        tokenizer=tokenizer,
        spec=spec,
        chat=chat,
    )
