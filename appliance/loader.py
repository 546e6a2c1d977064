"""Load the installed model: verify the bundle, unwrap its key, decrypt into memory, build the engine.

Nothing decrypted touches the disk. The data key lives in a bytearray that is overwritten as soon
as the payload is decrypted; the plaintext model buffer, and the one ``bytes`` copy the engine
needs, are overwritten once the engine is built (the engine drops its own references to them).
(Best effort: copies inside OpenSSL, ONNX Runtime or Python's allocator are beyond reach.)
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

from tokenizers import Tokenizer

from appliance.config import Config
from appliance.engine import DecoderSpec, Engine, create_engine
from appliance.engine.plan_cache import PlanCache
from appliance.engine.select import Choice, DeviceCaps, PlanMismatchError, choose_engine, probe_device
from appliance.engine.weights import WeightBuffer, WeightsStillReadError
from appliance.errors import ApplianceError
from appliance.serving.chat import ChatTemplate, LiteralContent
from provisioning.bundle import Bundle, EngineEntry
from provisioning.draft import DRAFT_PREFIX, check_vocabularies
from provisioning.install import current_bundle
from provisioning.keys import DEVICE_X25519, load_trusted_vendors, load_x25519, wipe

log = logging.getLogger("appliance.loader")
MODEL_FILE, SPEC_FILE, TOKENIZER_FILE = "model.onnx", "decoder.json", "tokenizer.json"
EXTERNAL_DATA_FILE = "model.onnx.data"  # weights of models past the 2 GB protobuf limit
PLAN_CACHE_DIR = "plan-cache"  # under state_dir: TensorRT plans built on this device, encrypted
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
    # message contents tokenized with special-token texts as text ([engine] content_special_tokens = "literal")
    literal_content: LiteralContent | None = None
    draft: Engine | None = None  # the bundle's speculative-decoding draft model ([engine] speculative)


def installed_bundle(config: Config) -> Bundle:
    bundle = current_bundle(config.state_dir, load_trusted_vendors(config.trust_dir))
    if bundle is None:
        raise ModelLoadError(
            f"no model installed under {config.state_dir}; install one with 'edge-provision install BUNDLE --state DIR'"
        )
    return bundle


def load_model(config: Config, kind: str | None = None, caps: DeviceCaps | None = None) -> LoadedModel:
    """Decrypt the installed bundle into the engine ``kind`` (default: ``[engine] kind``) selects."""
    bundle = installed_bundle(config)
    kind = kind or config.engine.kind
    caps = caps or (DeviceCaps() if kind == "onnxruntime" else probe_device())
    device_key = load_x25519(DEVICE_X25519, config.key_dir)
    data_key = bundle.unwrap_key(device_key)
    files: dict[str, bytearray | WeightBuffer] = {}
    engine = None
    try:
        spec = DecoderSpec.from_json(bytes(bundle.decrypt_into(SPEC_FILE, data_key)))
        tokenizer = Tokenizer.from_str(bundle.decrypt_into(TOKENIZER_FILE, data_key).decode("utf-8"))
        present = {f.id for f in bundle.files()}
        chat = ChatTemplate.from_files(
            *(bytes(bundle.decrypt_into(f, data_key)) if f in present else None for f in CHAT_FILES)
        )
        try:
            choice = choose_engine(kind, bundle.engines(), caps)
        except PlanMismatchError as exc:
            choice = _plan_built_here(config, bundle, caps, exc, spec)
        log.info("engine %s (%s): %s", choice.entry.kind, choice.entry.dtype, choice.reason)
        for file_id in choice.entry.files:
            files[file_id] = _decrypt(bundle, file_id, data_key, borrow=choice.entry.kind == "onnxruntime")
        if choice.entry.kind == "tensorrt" and not choice.entry.files:
            cache = PlanCache(config.state_dir / PLAN_CACHE_DIR, device_key)
            files["plan"] = bytearray(
                cache.get_or_build(
                    bundle.manifest["bundle_id"],
                    choice.entry.target,
                    lambda: _build_plan(bundle, data_key, spec, config),
                )
            )
        fallback = False
        try:
            engine = _create(choice.entry, files, spec, config)
        except WeightsStillReadError as exc:  # this CPU did not prepack them: ONNX Runtime keeps its own copy
            log.warning("%s; the loader keeps a full copy of the weights instead", exc)
            fallback = True
        if fallback:  # outside the handler: its traceback no longer holds the failed sessions' memory
            gc.collect()
            for file_id in choice.entry.files:  # the graph itself was consumed (and wiped) by the first try
                if file_id not in files or isinstance(files[file_id], WeightBuffer):
                    if file_id in files:
                        files[file_id].wipe()
                    files[file_id] = bundle.decrypt_into(file_id, data_key)
            engine = _create(choice.entry, files, spec, config)
        for buf in files.values():
            if isinstance(buf, WeightBuffer):
                buf.join()  # its decryption's outcome (a chunk failing authentication raises here)
        wants_draft = config.engine.speculative in ("draft", "auto")
        draft = _load_draft(bundle, data_key, config, tokenizer) if wants_draft else None
    except BaseException:
        engine = None
        raise
    finally:
        for buf in files.values():
            if isinstance(buf, WeightBuffer):
                buf.join(quiet=True)  # no decryption thread outlives the key
        wipe(data_key)
        del device_key
        for buf in files.values():  # borrowed WeightBuffers now belong to the engine's session
            if not isinstance(buf, WeightBuffer):
                wipe(buf)
            elif engine is None:
                buf.wipe()
    return LoadedModel(
        model_id=bundle.model_id,
        version=bundle.version,
        bundle_id=bundle.manifest["bundle_id"],
        engine=engine,
        tokenizer=tokenizer,
        spec=spec,
        chat=chat,
        literal_content=LiteralContent(tokenizer) if config.engine.content_special_tokens == "literal" else None,
        draft=draft,
    )


def _load_draft(bundle: Bundle, data_key: bytearray, config: Config, tokenizer: Tokenizer) -> Engine | None:
    """The bundle's speculative-decoding draft model on its own ONNX Runtime engine (one slot per target slot),
    or None when the bundle carries none. A draft with another tokenizer is refused (``DraftMismatchError``)."""
    ids = {f.id for f in bundle.files()}
    if f"{DRAFT_PREFIX}{MODEL_FILE}" not in ids:
        return None
    spec = DecoderSpec.from_json(bytes(bundle.decrypt_into(DRAFT_PREFIX + SPEC_FILE, data_key)))
    vocab = Tokenizer.from_str(bundle.decrypt_into(DRAFT_PREFIX + TOKENIZER_FILE, data_key).decode("utf-8"))
    check_vocabularies(tokenizer.get_vocab(with_added_tokens=True), vocab.get_vocab(with_added_tokens=True))
    files = {f: bundle.decrypt_into(DRAFT_PREFIX + f, data_key) for f in (MODEL_FILE, EXTERNAL_DATA_FILE)
             if DRAFT_PREFIX + f in ids}  # fmt: skip
    graph = files.pop(MODEL_FILE)
    model = bytes(graph)
    wipe(graph)
    try:
        engine = create_engine(
            "onnxruntime",
            model,
            spec,
            num_slots=config.engine.max_batch,
            max_seq_len=config.engine.max_seq_len,
            # its own thread count (one per 16 MB read per token): a small draft runs best on the engine thread
            # alone, with no worker pool spinning against the model's between their runs
            threads=0,
            external=files,  # copied into ONNX Runtime's own buffers, then wiped below
            spin=config.engine.spin,
            affinity=config.engine.affinity,
        )
    finally:
        wipe(model)
        for buf in files.values():
            wipe(buf)
    log.info("speculative decoding draft: %s, %d layers", spec.architecture, spec.num_layers)
    return engine


def _decrypt(bundle: Bundle, file_id: str, data_key: bytearray, borrow: bool) -> bytearray | WeightBuffer:
    """External weights for ONNX Runtime go to a ``WeightBuffer`` it borrows in place; everything else to bytes."""
    if borrow and file_id == EXTERNAL_DATA_FILE:  # decrypted on a thread while the sessions are built
        buf = WeightBuffer(bundle.file(file_id).size)  # load_model joins the thread before it wipes ``data_key``
        buf.fill_async(lambda progress: bundle.decrypt_into(file_id, data_key, buf.view(), progress))
        return buf
    return bundle.decrypt_into(file_id, data_key)


def _create(
    entry: EngineEntry, files: dict[str, bytearray | WeightBuffer], spec: DecoderSpec, config: Config
) -> Engine:
    main = {"onnxruntime": MODEL_FILE, "torch": "model.safetensors"}.get(entry.kind)
    model = files.pop(main) if main else next(iter(files.values()))
    model_bytes = bytes(model)  # the engines take bytes: this copy is ours, wiped below
    wipe(model)
    try:
        return create_engine(
            entry.kind,
            model_bytes,
            spec,
            num_slots=config.engine.max_batch,
            max_seq_len=config.engine.max_seq_len,
            threads=config.engine.threads,
            external={k: v for k, v in files.items() if k == EXTERNAL_DATA_FILE},
            spin=config.engine.spin,
            affinity=config.engine.affinity,
            load_pieces=config.engine.load_pieces,
            checkpoint_config=bytes(files["config.json"]) if "config.json" in files else None,
            quantize=config.engine.quantize,
        )
    finally:
        wipe(model_bytes)
        del model_bytes


def _plan_built_here(
    config: Config, bundle: Bundle, caps: DeviceCaps, refused: PlanMismatchError, spec: DecoderSpec
) -> Choice:
    """``kind = "tensorrt"`` and no sealed plan fits this device: build one here from the float32 traced ONNX
    graph (TensorRT cannot parse the fused graphs' contrib operators) and cache it encrypted, if possible."""
    onnx = next((e for e in bundle.engines() if e.kind == "onnxruntime" and e.dtype == "float32"), None)
    if onnx is None or not (caps.cuda and caps.tensorrt):
        raise refused
    if spec.cache != "concat":
        raise PlanMismatchError(
            f"{refused}; and no plan can be built here: the bundle's graph is a fused {spec.cache}-cache graph "
            "TensorRT cannot parse (seal a traced float32 export, edge-models export --traced, or a plan)"
        )
    target = {"compute_capability": caps.compute_capability, "tensorrt": caps.tensorrt}
    return Choice(EngineEntry("tensorrt", (), "float16", target), f"plan built on this device ({refused})")


def _build_plan(bundle: Bundle, data_key: bytearray, spec: DecoderSpec, config: Config) -> bytes:
    from appliance.engine.trt_build import build_plan

    graph = bundle.decrypt_into(MODEL_FILE, data_key)
    try:
        return build_plan(bytes(graph), spec, max_batch=config.engine.max_batch, max_seq_len=config.engine.max_seq_len)
    finally:
        wipe(graph)
