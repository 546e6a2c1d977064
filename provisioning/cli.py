"""``edge-provision``: vendor keys, device enrollment, sealing, verification, install, rollback."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from .bundle import TORCH_FILES, EngineEntry, infer_engines, open_bundle, seal
from .draft import DRAFT_PREFIX, DraftMismatchError, check_vocabularies
from .errors import ProvisioningError, run_command
from .install import INSTALL_LOG, current_bundle, current_manifest_unverified, install, rollback, verify_fully
from .keys import (
    DEVICE_X25519,
    VENDOR_SIGNING,
    DeviceIdentity,
    enroll,
    fingerprint,
    load_ed25519,
    load_trusted_vendors,
    load_x25519,
    public_bytes,
    vendor_keygen,
)
from .layout import externalize

MODEL_FILES = ("model.onnx", "decoder.json", "tokenizer.json")
DEFAULT_TRUST = "/etc/edge-appliance/trusted-vendors"
# External weights of models past 2 GB; the tokenizer's config (special tokens, chat template) and a
# chat_template.jinja, which the daemon needs to render ``messages``.
OPTIONAL_FILES = ("model.onnx.data", "tokenizer_config.json", "chat_template.jinja")


def cmd_keygen(args: argparse.Namespace) -> int:
    fp = vendor_keygen(Path(args.vendor))
    print(
        f"vendor key {fp} written to {args.vendor} (keep vendor-ed25519.key offline; give devices "
        "vendor-ed25519.pub for their trust store)"
    )
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    credstore = Path(args.credstore) if args.credstore else None
    identity = enroll(Path(args.keys), args.device_id or socket.gethostname(), credstore)
    Path(args.out).write_text(identity.to_json())
    print(f"device {identity.device_id} enrolled: fingerprint {identity.fingerprint}; carry {args.out} to the vendor")
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ProvisioningError(f"{model_dir} lacks {', '.join(missing)}; export the model with 'edge-models export'")
    if args.draft:
        _check_draft(Path(args.draft), model_dir)
    key_path = Path(args.signing_key)
    signing = (
        load_ed25519(key_path.name, key_path.parent) if key_path.is_file() else load_ed25519(VENDOR_SIGNING, key_path)
    )
    recipients = [X25519PublicKey.from_public_bytes(DeviceIdentity.load(Path(r)).x25519) for r in args.recipient]
    spec = json.loads((model_dir / "decoder.json").read_text())
    files = {f: model_dir / f for f in MODEL_FILES + OPTIONAL_FILES if (model_dir / f).is_file()}
    if args.torch:
        checkpoint = Path(args.torch)
        lacking = [f for f in TORCH_FILES if not (checkpoint / f).is_file()]
        if lacking:
            raise ProvisioningError(
                f"{checkpoint} lacks {', '.join(lacking)}; give a transformers checkpoint saved with safetensors"
            )
        files.update({f: checkpoint / f for f in TORCH_FILES})
    with tempfile.TemporaryDirectory(prefix="edge-seal-") as staging:
        if "model.onnx.data" not in files:  # one weight layout for every size (provisioning/layout.py)
            files["model.onnx"], files["model.onnx.data"] = externalize(files["model.onnx"], Path(staging))
        if args.draft:
            files.update(_draft_files(Path(args.draft), Path(staging) / "draft"))
        engines = infer_engines(files) + [_plan_entry(spec_text, files) for spec_text in args.tensorrt_plan or []]
        manifest = seal(
            files,
            Path(args.out),
            model_id=args.model_id,
            version=args.version,
            architecture=spec["architecture"],
            engines=engines,
            signing_key=signing,
            recipients=recipients,
            chunk_size=args.chunk_size,
        )
    kinds = ", ".join(f"{e['kind']} ({e['dtype']})" for e in manifest["engines"])
    print(
        f"sealed {args.model_id} v{args.version} → {args.out} (bundle {manifest['bundle_id']}, "
        f"{len(recipients)} recipient(s); engines: {kinds})"
    )
    return 0


def _check_draft(draft: Path, model_dir: Path) -> None:
    """The speculative-decoding draft must be an ONNX export whose tokenizer is the target's, token for token
    (checked here and again on the device)."""
    from tokenizers import Tokenizer

    missing = [f for f in MODEL_FILES if not (draft / f).is_file()]
    if missing:
        raise ProvisioningError(f"draft {draft} lacks {', '.join(missing)}; export it with 'edge-models export'")
    try:
        check_vocabularies(
            Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True),
            Tokenizer.from_file(str(draft / "tokenizer.json")).get_vocab(with_added_tokens=True),
        )
    except DraftMismatchError as exc:
        raise ProvisioningError(f"--draft {draft}: {exc}") from None


def _draft_files(draft: Path, staging: Path) -> dict[str, Path]:
    """The draft model's payload files (``draft/…``), its weights in ``model.onnx.data`` like the target's."""
    files = {f"{DRAFT_PREFIX}{f}": draft / f for f in MODEL_FILES}
    data = f"{DRAFT_PREFIX}model.onnx.data"
    if (draft / "model.onnx.data").is_file():
        files[data] = draft / "model.onnx.data"
    else:
        files[f"{DRAFT_PREFIX}model.onnx"], files[data] = externalize(draft / "model.onnx", staging)
    return files


def _plan_entry(value: str, files: dict[str, Path]) -> EngineEntry:
    """``PLAN:CC:TRT[:DTYPE]`` → a tensorrt engine entry; the plan joins the payload under its file name."""
    parts = value.rsplit(":", 3)
    if len(parts) < 3 or (len(parts) == 3 and not parts[0]):
        raise ProvisioningError(f"--tensorrt-plan {value!r}: expected PLAN:COMPUTE_CAPABILITY:TENSORRT[:DTYPE]")
    if len(parts) == 3:
        parts.append("float16")
    path, cc, trt, dtype = Path(parts[0]), parts[1], parts[2], parts[3]
    if not path.is_file():
        raise ProvisioningError(f"--tensorrt-plan: {path} is not a file")
    file_id = f"tensorrt/sm{cc}-trt{trt}/{path.name}"
    files[file_id] = path
    return EngineEntry("tensorrt", (file_id,), dtype, {"compute_capability": cc, "tensorrt": trt})


def cmd_verify(args: argparse.Namespace) -> int:
    bundle = open_bundle(Path(args.bundle), load_trusted_vendors(Path(args.trust)))
    key = load_x25519(DEVICE_X25519, Path(args.keys)) if args.keys else None
    verify_fully(bundle, key)
    scope = "signature, hashes, recipient entry and every chunk" if key else "signature and payload hashes"
    print(f"OK: {bundle.model_id} v{bundle.version} ({scope} verified)")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with tqdm(desc="copying to staging", unit="B", unit_scale=True, disable=None, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = install(
            Path(args.bundle),
            Path(args.state),
            load_trusted_vendors(Path(args.trust)),
            load_x25519(DEVICE_X25519, Path(args.keys)),
            allow_downgrade=args.allow_downgrade,
            replace_model=args.replace_model,
            progress=progress,
        )
    if result.replaced_model:
        print(f"replaced model {result.replaced_model} (recorded in {Path(args.state) / INSTALL_LOG})")
    if result.changed:
        print(
            f"installed {result.model_id} v{result.version} into slot {result.slot}; restart or reload the "
            "daemon: systemctl reload edge-appliance"
        )
    else:
        print(f"{result.model_id} v{result.version} is already installed (slot {result.slot}); nothing to do")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    print(f"current slot is now {rollback(Path(args.state))}; restart the daemon to load it")
    return 0


def cmd_wheelhouse(args: argparse.Namespace) -> int:
    from .wheelhouse import build_wheelhouse

    key_path = Path(args.signing_key)
    signing = (
        load_ed25519(key_path.name, key_path.parent) if key_path.is_file() else load_ed25519(VENDOR_SIGNING, key_path)
    )
    wheels = build_wheelhouse(Path(args.out), args.platform, args.python_version, signing)
    print(
        f"{len(wheels)} wheels, the signed wheels.lock and install-offline.sh written to {args.out}; on the device "
        f"run: sh {args.out}/install-offline.sh (vendor key fingerprint for --first-trust: "
        f"{fingerprint(public_bytes(signing.public_key()))})"
    )
    return 0


def cmd_install_software(args: argparse.Namespace) -> int:
    from . import stick

    argv = [args.prefix, "--stick", args.stick, "--trust", args.trust]
    return stick.main(argv)


def cmd_status(args: argparse.Namespace) -> int:
    """The installed model. Its signature is checked when a trust store is given or the default one holds keys;
    without one (a stick's status script, a support session) the manifest is shown marked unverified."""
    state = Path(args.state)
    trust = Path(args.trust or DEFAULT_TRUST)
    if args.trust or any(trust.glob("*.pub")):
        bundle = current_bundle(state, load_trusted_vendors(trust))
        manifest, slot = (bundle.manifest, bundle.root.name) if bundle else (None, None)
        verified = f"verified against {trust}"
    else:
        manifest, slot = current_manifest_unverified(state)
        verified = "not checked: no trust store (pass --trust DIR to verify the signature)"
    if manifest is None:
        print("no model installed")
        return 1
    fields = ("model_id", "version", "bundle_id", "vendor_key")
    print(json.dumps({"slot": slot, **{k: manifest.get(k) for k in fields}, "signature": verified}, indent=2))
    return 0


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust",
        default=DEFAULT_TRUST,
        help=f"directory of trusted vendor public keys, *.pub (default: {DEFAULT_TRUST})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-provision", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="create a vendor signing key pair")
    k.add_argument("--vendor", required=True, help="directory for vendor-ed25519.key (0600) and .pub")
    k.set_defaults(func=cmd_keygen)
    e = sub.add_parser("enroll", help="create this device's identity (X25519, Ed25519, CURVE keys)")
    e.add_argument("--keys", required=True, help="directory for the private keys (0600) and the public identity")
    e.add_argument("--out", required=True, help="public identity file to carry to the vendor")
    e.add_argument("--device-id", help="device name recorded in the identity (default: hostname)")
    e.add_argument(
        "--credstore",
        help="seal the private keys with systemd-creds into this directory (e.g. "
        "/etc/credstore.encrypted) instead of 0600 files in --keys",
    )
    e.set_defaults(func=cmd_enroll)
    s = sub.add_parser("seal", help="encrypt and sign an exported model into a bundle")
    s.add_argument("--model", required=True, help="directory with model.onnx, decoder.json, tokenizer.json")
    s.add_argument("--model-id", required=True, help="model name devices report")
    s.add_argument("--version", required=True, type=int, help="monotonically increasing model version")
    s.add_argument("--signing-key", required=True, help="vendor signing key file or its directory")
    s.add_argument("--recipient", required=True, action="append", help="device identity file (repeatable)")
    s.add_argument("--out", required=True, help="bundle directory to create (must not exist)")
    s.add_argument("--chunk-size", type=int, default=1 << 20, help="plaintext bytes per AES-GCM chunk (default 1 MiB)")
    s.add_argument(
        "--torch",
        help="transformers checkpoint directory (model.safetensors, config.json) to carry for the torch engine",
    )
    s.add_argument(
        "--draft",
        help="exported ONNX directory of a smaller model with the same tokenizer, sealed as the speculative-decoding "
        "draft (e.g. the distilled student of --model)",
    )
    s.add_argument(
        "--tensorrt-plan",
        action="append",
        metavar="PLAN:CC:TRT[:DTYPE]",
        help="TensorRT plan and the target it was built for, e.g. plan.bin:8.7:10.3.0:float16 (repeatable)",
    )
    s.set_defaults(func=cmd_seal)
    v = sub.add_parser("verify", help="check a bundle without installing it (writes nothing)")
    v.add_argument("bundle", help="bundle directory")
    _trust_flag(v)
    v.add_argument("--keys", help="device key directory: also check the recipient entry and every chunk's tag")
    v.set_defaults(func=cmd_verify)
    i = sub.add_parser("install", help="verify, copy into the inactive A/B slot, switch atomically")
    i.add_argument("bundle", help="bundle directory (e.g. on the USB stick)")
    i.add_argument("--state", required=True, help="device state directory")
    _trust_flag(i)
    i.add_argument("--keys", required=True, help="device private key directory")
    i.add_argument(
        "--allow-downgrade", action="store_true", help="install even if not newer than this model id's highest version"
    )
    i.add_argument(
        "--replace-model",
        action="store_true",
        help="install a bundle of another model id than the one served (recorded in the install log)",
    )
    i.set_defaults(func=cmd_install)
    r = sub.add_parser("rollback", help="switch back to the previously installed slot")
    r.add_argument("--state", required=True, help="device state directory")
    r.set_defaults(func=cmd_rollback)
    st = sub.add_parser("status", help="show the installed model (its signature checked where a trust store is found)")
    st.add_argument("--state", required=True, help="device state directory")
    st.add_argument(
        "--trust",
        help=f"trusted vendor keys (*.pub) to verify the manifest with (default: {DEFAULT_TRUST} where it holds keys; "
        "without any, the manifest is shown unverified)",
    )
    st.set_defaults(func=cmd_status)
    w = sub.add_parser("wheelhouse", help="download the software's wheels for an offline install (connected machine)")
    w.add_argument("--out", required=True, help="directory to fill (e.g. the USB stick)")
    w.add_argument(
        "--platform",
        help="target wheel platform, e.g. manylinux_2_28_x86_64 or manylinux_2_35_aarch64 "
        "(Jetson, JetPack 6); default: this machine",
    )
    w.add_argument("--python-version", help="target Python, e.g. 3.10 (JetPack 6); default: this interpreter")
    w.add_argument("--signing-key", required=True, help="vendor signing key file or its directory (signs wheels.lock)")
    w.set_defaults(func=cmd_wheelhouse)
    sw = sub.add_parser(
        "install-software",
        help="upgrade the software from a signed stick with this device's own (already trusted) installer",
    )
    sw.add_argument("stick", help="the stick's wheelhouse directory")
    sw.add_argument("--prefix", default="/opt/edge-appliance/venv", help="virtual environment to install into")
    _trust_flag(sw)
    sw.set_defaults(func=cmd_install_software)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("edge-provision", lambda: args.func(args), (ProvisioningError,))


if __name__ == "__main__":
    sys.exit(main())
