"""Decrypt-and-load throughput of a sealed bundle vs this CPU's raw AES-256-GCM speed, same run.

Seals a payload of --size-mib (default 1024) random bytes in 1 MiB chunks, then measures:
raw AES-GCM decrypt_into on in-memory chunks (the ceiling), decrypt-and-load from the bundle
files into one preallocated buffer (what the daemon does at start), and full verification
(hashes + every chunk tag, what install does). Writes bench/results/bundle_throughput.json.

    .venv/bin/python bench/bundle_throughput.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from provisioning.bundle import DEFAULT_CHUNK, open_bundle, seal  # noqa: E402
from provisioning.install import verify_fully  # noqa: E402
from provisioning.keys import fingerprint, public_bytes, wipe  # noqa: E402


def best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def raw_aes_gcm(total: int, chunk: int = DEFAULT_CHUNK) -> float:
    """Bytes/s of AESGCM.decrypt_into over ``total`` bytes of 1 MiB chunks held in memory."""
    aead = AESGCM(AESGCM.generate_key(256))
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, os.urandom(chunk), b"aad")
    out = bytearray(chunk)
    n = total // chunk

    def run() -> None:
        for _ in range(n):
            aead.decrypt_into(nonce, sealed, b"aad", out)

    return n * chunk / best_of(3, run)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="payload size in MiB (default: 1024)")
    p.add_argument("--out", default="bench/results/bundle_throughput.json", help="results file")
    args = p.parse_args()
    size = args.size_mib << 20
    vendor, device = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    trusted = {fingerprint(public_bytes(vendor.public_key())): vendor.public_key()}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        src = Path(tmp) / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        t = time.perf_counter()
        seal(
            {"model.onnx": src},
            Path(tmp) / "bundle",
            model_id="bench",
            version=1,
            architecture="X",
            engines=[],
            signing_key=vendor,
            recipients=[device.public_key()],
        )
        seal_s = time.perf_counter() - t
        src.unlink()
        raw = raw_aes_gcm(size)
        bundle = open_bundle(Path(tmp) / "bundle", trusted)
        key = bundle.unwrap_key(device)
        buf = bytearray(size)
        load_s = best_of(3, lambda: bundle.decrypt_into("model.onnx", key, buf))
        wipe(buf)
        verify_s = best_of(2, lambda: verify_fully(bundle, device))
    result = {
        "payload_bytes": size,
        "chunk_bytes": DEFAULT_CHUNK,
        "cpus": os.cpu_count(),
        "raw_aes_gcm_GBps": raw / 1e9,
        "decrypt_and_load_GBps": size / load_s / 1e9,
        "ratio_load_vs_raw": (size / load_s) / raw,
        "verify_seconds": verify_s,
        "seal_seconds": seal_s,
        "note": "load = read sealed files from the page cache, authenticate and decrypt into one preallocated buffer",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"raw AES-256-GCM decrypt_into : {result['raw_aes_gcm_GBps']:.2f} GB/s")
    print(
        f"decrypt-and-load from bundle : {result['decrypt_and_load_GBps']:.2f} GB/s "
        f"({result['ratio_load_vs_raw']:.2f} of raw)"
    )
    print(f"full verify (hashes + tags)  : {verify_s:.2f} s for {args.size_mib} MiB; seal took {seal_s:.2f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
