"""``edge-appliance audit …``: list, verify, export, verify-export, prune, reveal."""

from __future__ import annotations

import argparse
import json
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from appliance.audit.schema import CHAINED_FIELDS
from appliance.audit.store import AuditLog, Filters
from appliance.config import ConfigError, config_path, load_config
from provisioning.keys import (
    DEVICE_ED25519,
    IDENTITY_FILE,
    DeviceIdentity,
    load_ed25519,
    load_public_ed25519,
    load_x25519,
)


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO date/time (UTC when no zone is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither unix seconds nor an ISO date like 2026-11-23") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _device_public(config, explicit: str | None):
    path = Path(explicit) if explicit else (config.key_dir / IDENTITY_FILE if config.key_dir else None)
    return load_public_ed25519(path) if path and path.exists() else None


def _open(config) -> AuditLog:
    if not config.audit_db.exists():
        raise ConfigError(f"no audit database at {config.audit_db} (the daemon creates it on first start)")
    return AuditLog(config.audit_db)


def cmd_list(args, config) -> int:
    audit = _open(config)
    try:
        rows = audit.rows(
            Filters(
                since=args.since,
                until=args.until,
                client=args.client,
                status=args.status,
                model_version=args.model_version,
                limit=args.limit,
            )
        )
    finally:
        audit.close()
    if args.json:
        # Sealed content stays out of a listing; everything else the chain covers, and the row hash.
        fields = (*CHAINED_FIELDS, "cache_hit", "occurrences", "row_hash")
        out = [{k: getattr(r, k) for k in fields} for r in rows]
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{'seq':>5} {'time (UTC)':19} {'request':12} {'client':20} {'op':8} {'model':>6} {'status':8} "
        f"{'error':12} {'in':>4} {'out':>4} {'total ms':>9} {'count':>5}"
    )
    for r in rows:
        print(
            f"{r.seq:>5} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r.ts))} {printable(r.request_id)[:12]:12} "
            f"{printable(r.client)[:20]:20} {printable(r.op)[:8]:8} {str(r.model_version or '-')[-6:]:>6} "
            f"{r.status:8} {printable(r.error_code or '-')[:12]:12} {r.prompt_tokens:>4} {r.completion_tokens:>4} "
            f"{r.total_ms or 0:>9.1f} {r.occurrences or 1:>5}"
        )
    return 0


def printable(text: str) -> str:
    """Client-chosen text made safe for a terminal: control and other unprintable characters are
    shown as escapes (``\\x1b``), never interpreted."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def cmd_verify(args, config) -> int:
    from appliance.audit.export import check_against_exports

    key = _device_public(config, args.device_key)
    if args.against and key is None:
        raise ConfigError("--against needs the device's public key: pass --device-key device-identity.json")
    audit = _open(config)
    try:
        result = audit.verify(key)
        cut = check_against_exports(audit, Path(args.against), key) if args.against else []
    finally:
        audit.close()
    note = (
        ""
        if key
        else " (no device-identity.json in [paths] key_dir: checkpoint signatures NOT checked; "
        "pass --device-key or point key_dir at the directory enroll wrote it to)"
    )
    ok = result.ok and not cut
    print(("OK: " if ok else "TAMPERED: ") + "; ".join([*cut, result.message]) + note)
    return 0 if ok else 1


def cmd_export(args, config) -> int:
    from appliance.audit.export import export

    signing = load_ed25519(DEVICE_ED25519, config.key_dir)
    identity = config.key_dir / IDENTITY_FILE if config.key_dir else None
    device_id = DeviceIdentity.load(identity).device_id if identity and identity.exists() else socket.gethostname()
    audit = AuditLog(config.audit_db, signing_key=signing)
    try:
        result = export(audit, Path(args.to), signing, device_id, since_seq=args.since_seq)
    finally:
        audit.close()
    if result.path is None:
        print(f"nothing to export: no rows after {result.from_seq - 1}")
    else:
        print(f"exported rows {result.from_seq}..{result.to_seq} ({result.count}) to {result.path}")
    return 0


def cmd_verify_export(args, _config) -> int:
    from appliance.audit.export import verify_export

    result = verify_export(Path(args.dir), load_public_ed25519(Path(args.device_key)))
    print(("OK: " if result.ok else "TAMPERED: ") + result.message)
    return 0 if result.ok else 1


def cmd_reveal(args, _config) -> int:
    from appliance.audit.export import reveal

    reviewer = load_x25519(Path(args.reviewer_key).name, Path(args.reviewer_key).parent)
    rows = reveal(Path(args.dir), load_public_ed25519(Path(args.device_key)), reviewer)
    for row in rows:
        print(json.dumps({k: row.get(k) for k in ("seq", "ts", "request_id", "client", "status", "prompt", "output")}))
    return 0


def cmd_prune(args, config) -> int:
    from appliance.audit.export import prune

    signing = load_ed25519(DEVICE_ED25519, config.key_dir)
    audit = _open(config)
    try:
        result = prune(audit, args.exported_before, signing)
    finally:
        audit.close()
    print(
        f"removed {result.removed} exported row(s); the chain now starts after the signed anchor at row "
        f"{result.anchor_seq}; rows after {result.exported_to} are not in a contiguous series of exports and are kept"
    )
    return 0


COMMANDS = {
    "list": cmd_list,
    "verify": cmd_verify,
    "export": cmd_export,
    "verify-export": cmd_verify_export,
    "reveal": cmd_reveal,
    "prune": cmd_prune,
}


def add_parser(sub) -> None:
    au = sub.add_parser("audit", help="read, verify, export and prune the audit log")
    asub = au.add_subparsers(dest="audit_command", required=True)
    al = asub.add_parser("list", help="one line per audited request (needs --config)")
    al.add_argument("--since", type=parse_time, help="only rows at or after this time (unix or ISO, UTC)")
    al.add_argument("--until", type=parse_time, help="only rows before this time")
    al.add_argument("--client", help="only rows of this client identity")
    al.add_argument("--status", choices=["ok", "error", "rejected"], help="only rows with this status")
    al.add_argument("--model-version", type=int, help="only rows served by this model version")
    al.add_argument("--limit", type=int, help="only the newest N matching rows")
    al.add_argument("--json", action="store_true", help="JSON instead of a table")
    av = asub.add_parser(
        "verify", help="check the live database's chain and signed checkpoints; names the first broken row"
    )
    av.add_argument("--device-key", help="device identity file (default: device-identity.json in key_dir)")
    av.add_argument(
        "--against",
        help="the reviewer's exports (a directory of them): report rows they hold that the log no longer has",
    )
    ae = asub.add_parser("export", help="write the rows since the last export, signed, to a directory (USB)")
    ae.add_argument("--to", required=True, help="directory to write into, e.g. /media/usb/audit")
    ae.add_argument("--since-seq", type=int, help="start at this row instead of after the last completed export")
    ax = asub.add_parser("verify-export", help="verify an export (or a directory of them) without the daemon")
    ax.add_argument("dir", help="an export directory, or the directory holding several")
    ax.add_argument("--device-key", required=True, help="the device's identity file (or raw Ed25519 public key)")
    ar = asub.add_parser("reveal", help="show an export's sealed prompts/outputs (content policy 'encrypted')")
    ar.add_argument("dir", help="an export directory")
    ar.add_argument("--device-key", required=True, help="the device's identity file")
    ar.add_argument("--reviewer-key", required=True, help="the reviewer's X25519 private key file (0600)")
    ap = asub.add_parser(
        "prune", help="delete rows older than a date that contiguous exports hold; leaves a signed anchor"
    )
    ap.add_argument("--exported-before", required=True, type=parse_time, help="cut-off time (unix or ISO, UTC)")
    for p in (al, av, ae, ax, ar, ap):
        p.set_defaults(func=lambda args: run(args))


def run(args) -> int:
    needs_config = args.audit_command not in ("verify-export", "reveal")
    config = load_config(config_path(args)) if needs_config else None
    return COMMANDS[args.audit_command](args, config)
