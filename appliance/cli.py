"""``edge-appliance``: run the daemon, query it, read its audit log."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from appliance.config import DEFAULT_CONFIG, DEFAULT_ENDPOINT, ConfigError, load_config, render_config


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("EDGE_APPLIANCE_CONFIG") or DEFAULT_CONFIG)


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    path = _config_path(args)
    if args.config or path.exists():
        return load_config(path).server.endpoints[0]
    return DEFAULT_ENDPOINT


def _client(args: argparse.Namespace):
    """A client from the common flags, with CURVE when --server-key and --client-key are given."""
    from appliance.transport.client import Client

    server_key = keypair = None
    if args.server_key or args.client_key:
        import zmq

        from provisioning.keys import read_private

        if not (args.server_key and args.client_key):
            raise ConfigError("CURVE needs both --server-key and --client-key")
        server_key = _server_key(args.server_key)
        path = Path(args.client_key)
        secret = bytes(read_private(path.name, path.parent)).strip()
        keypair = (zmq.curve_public(secret), secret)
    return Client(
        _endpoint(args),
        timeout_s=args.timeout,
        retries=args.retries,
        curve_server_key=server_key,
        curve_keypair=keypair,
    )


def _server_key(value: str) -> bytes:
    """A Z85 server key, or a device identity file carrying ``curve_public``."""
    if len(value) == 40 and not Path(value).exists():
        return value.encode()
    from provisioning.keys import DeviceIdentity

    return DeviceIdentity.load(Path(value)).curve_public.encode()


def cmd_client_keygen(args: argparse.Namespace) -> int:
    from appliance.transport.auth import client_keygen

    entry = client_keygen(Path(args.out), args.name)
    print(
        f"wrote {args.out}/client.key (0600) and client.pub; add to the daemon's allow-list:\n\n"
        f'[[client]]\nname = "{entry.name}"\nkey = "{entry.key}"\nrole = "infer"'
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.daemon import run_daemon
    from appliance.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    return run_daemon(load_config(_config_path(args)))


def cmd_ask(args: argparse.Namespace) -> int:
    params = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop or None,
        "session": args.session,
    }
    with _client(args) as client:
        if args.end_session:
            print(json.dumps(client.end_session(args.end_session)))
            return 0
        if not args.prompt:
            print("edge-appliance ask: a prompt is required", file=sys.stderr)
            return 2
        final: dict = {}
        for event in client.generate(args.prompt, **params):
            if event["type"] == "token" and not args.json:
                print(event["text"], end="", flush=True)
            final = event
    if args.json:
        print(json.dumps(final, indent=2))
    else:
        t, u = final["timings"], final["usage"]
        print(
            f"\n[{u['completion_tokens']} tokens, {final['finish_reason']}, first token {t['ttft_ms']:.0f} ms, "
            f"{t.get('tokens_per_s', 0):.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def cmd_simple(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.call(args.command), indent=2))
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from appliance.selftest import as_dicts, format_table, run_selftest

    rows = run_selftest(load_config(_config_path(args)), tokens=args.tokens)
    print(json.dumps(as_dicts(rows), indent=2) if args.json else format_table(rows))
    return 1 if any(r.verdict == "DIFFERS" for r in rows) else 0


def cmd_init(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_config(args.state_dir, args.trust_dir, args.key_dir, args.audit_db, args.endpoint))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-appliance", description=__doc__)
    p.add_argument("--config", help=f"daemon config file (default: $EDGE_APPLIANCE_CONFIG or {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify aware)")
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="minimum level logged (default: info)",
    )
    s.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text for people, json for one object per line (default: text)",
    )
    s.set_defaults(func=cmd_serve)

    def client_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--endpoint", help=f"daemon address (default: from --config, else {DEFAULT_ENDPOINT})")
        sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply (default: 30)")
        sp.add_argument("--retries", type=int, default=3, help="attempts before giving up (default: 3)")
        sp.add_argument("--server-key", help="CURVE: the daemon's public key (Z85) or its device-identity.json")
        sp.add_argument("--client-key", help="CURVE: this client's secret key file (from client-keygen)")

    a = sub.add_parser("ask", help="send a prompt and stream the answer")
    a.add_argument("prompt", nargs="?", help="the prompt text (required unless --end-session)")
    a.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    a.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    a.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    a.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this total probability")
    a.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    a.add_argument("--stop", action="append", help="stop when this text appears (repeatable, up to 4)")
    a.add_argument("--json", action="store_true", help="print the final reply as JSON instead of streaming text")
    a.add_argument(
        "--session",
        help="conversation id: the daemon keeps its context between turns, so each "
        "`ask --session ID` continues it and prefills only the new text",
    )
    a.add_argument("--end-session", metavar="ID", help="forget conversation ID instead of asking (prompt ignored)")
    client_flags(a)
    a.set_defaults(func=cmd_ask)

    for name, text in (
        ("health", "daemon health: audit store, queue, uptime"),
        ("info", "model id, version, engine and limits"),
    ):
        sp = sub.add_parser(name, help=text)
        client_flags(sp)
        sp.set_defaults(func=cmd_simple)

    k = sub.add_parser("client-keygen", help="make a CURVE key pair for a client and print its allow-list entry")
    k.add_argument("--out", required=True, help="directory for client.key (0600) and client.pub")
    k.add_argument("--name", required=True, help="the client's name in the allow-list and the audit log")
    k.set_defaults(func=cmd_client_keygen)

    t = sub.add_parser(
        "selftest",
        help="load the installed bundle on every engine this device runs: greedy parity with ONNX Runtime, "
        "batch-1 tokens/s and bandwidth, one table (exit 1 when a same-precision engine differs)",
    )
    t.add_argument("--tokens", type=int, default=32, help="greedy tokens per engine (default: 32)")
    t.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    t.set_defaults(func=cmd_selftest)
    i = sub.add_parser("init", help="write a config file for a device")
    i.add_argument("--out", required=True, help="config file to write")
    i.add_argument("--state-dir", default="state", help="installed bundles (relative to the config file)")
    i.add_argument("--trust-dir", default="trust", help="trusted vendor public keys")
    i.add_argument("--key-dir", default="credentials", help="device private keys (0600)")
    i.add_argument("--audit-db", default="state/audit.db", help="SQLite audit database")
    i.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="ZeroMQ endpoint to bind")
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    i.set_defaults(func=cmd_init)

    from appliance.audit.cli import add_parser as add_audit_parser

    add_audit_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from appliance.audit import AuditError
    from appliance.engine import EngineError
    from appliance.loader import ModelLoadError
    from appliance.transport.auth import AuthConfigError
    from appliance.transport.client import ClientError
    from appliance.transport.server import BindError
    from provisioning.errors import ProvisioningError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ConfigError,
        ClientError,
        AuditError,
        AuthConfigError,
        BindError,
        EngineError,
        ModelLoadError,
        ProvisioningError,
    ) as exc:
        print(f"edge-appliance: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
