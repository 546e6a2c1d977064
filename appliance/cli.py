"""``edge-appliance``: run the daemon, query it, read its audit log."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from appliance.config import DEFAULT_CONFIG, DEFAULT_ENDPOINT, ConfigError, config_path, load_config, render_config


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    path = config_path(args)
    if args.config or path.exists():
        return load_config(path).server.endpoints[0]
    return DEFAULT_ENDPOINT


def _client(args: argparse.Namespace):
    """A client from the common flags, with CURVE when --server-key and --client-key are given."""
    from appliance.transport.auth import server_public_key
    from appliance.transport.client import Client

    server_key = keypair = None
    if args.server_key or args.client_key:
        import zmq

        from provisioning.keys import read_private

        if not (args.server_key and args.client_key):
            raise ConfigError("CURVE needs both --server-key and --client-key")
        server_key = server_public_key(args.server_key)
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


def cmd_client_keygen(args: argparse.Namespace) -> int:
    from appliance.transport.auth import client_keygen

    entry = client_keygen(Path(args.out), args.name, args.role)
    print(
        f"wrote {args.out}/client.key (0600) and client.pub; its identity (audit subject, scope of its requests, "
        f"sessions and cache; what an admin names in cancel/end_session) is {entry.user_id}\n"
        "add to the daemon's allow-list:\n\n"
        f'[[client]]\nname = "{entry.name}"\nkey = "{entry.key}"\nrole = "{entry.role}"'
    )
    return 0


def cmd_http_keygen(args: argparse.Namespace) -> int:
    from appliance.transport.api_keys import entry_toml, mint

    key, entry = mint(args.name, args.role)
    print(f"API key (shown once, store it in the client; only its hash is kept):\n\n    {key}\n", file=sys.stderr)
    print(f"# add to the [http] keys file, then `systemctl reload edge-appliance-http`:\n{entry_toml(entry)}", end="")
    return 0


def cmd_http(args: argparse.Namespace) -> int:
    from appliance.logs import setup_logging
    from appliance.transport.http import run_gateway

    setup_logging(args.log_level, args.log_format)
    return run_gateway(load_config(config_path(args)))


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.daemon import run_daemon
    from appliance.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    return run_daemon(load_config(config_path(args)))


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
        chat = not args.raw and client.info().get("chat_template", False)
        if args.system and not chat:
            why = "--raw sends plain text" if args.raw else "the model has no chat template"
            print(f"edge-appliance ask: --system needs chat ({why})", file=sys.stderr)
            return 2
        if chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            params.update(messages=[*system, {"role": "user", "content": args.prompt}], reasoning=args.reasoning)
        final: dict = {}
        for event in client.generate(None if chat else args.prompt, **params):
            if event["type"] == "token" and not args.json:
                if event.get("reasoning"):  # the model's thinking goes to stderr; stdout carries the answer
                    print(event["reasoning"], end="", file=sys.stderr, flush=True)
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


def cmd_reload(args: argparse.Namespace) -> int:
    from appliance import reload

    pid = args.pid or os.environ.get("MAINPID")
    if not pid or not str(pid).isdigit():
        raise ConfigError("no daemon pid: pass --pid (systemd sets $MAINPID for ExecReload=)")
    status = reload.request(load_config(config_path(args)).state_dir, int(pid), args.timeout)
    if not status.ok:
        from appliance.logs import error_prefix

        print(f"{error_prefix()}edge-appliance reload: {status.message}", file=sys.stderr)
        return 1
    print(f"edge-appliance reload: {status.message}")
    return 0


def cmd_http_reload(args: argparse.Namespace) -> int:
    """SIGHUP to the gateway (it re-reads the API key file), from Python: minimal images have no kill(1)."""
    import signal

    pid = args.pid or os.environ.get("MAINPID")
    if not pid or not str(pid).isdigit():
        raise ConfigError("no gateway pid: pass --pid (systemd sets $MAINPID for ExecReload=)")
    try:
        os.kill(int(pid), signal.SIGHUP)
    except OSError as exc:
        raise ConfigError(f"cannot signal the gateway (pid {pid}): {exc.strerror}") from None
    print(f"edge-appliance http-reload: asked the gateway (pid {pid}) to re-read its API key file")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.call("metrics")["text"], end="")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from appliance.selftest import as_dicts, format_table, run_selftest

    rows = run_selftest(load_config(config_path(args)), tokens=args.tokens)
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

    def log_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--log-level",
            default="info",
            choices=["debug", "info", "warning", "error"],
            help="minimum level logged (default: info)",
        )
        sp.add_argument(
            "--log-format",
            default="text",
            choices=["text", "json"],
            help="text for people, json for one object per line (default: text)",
        )

    s = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify aware)")
    log_flags(s)
    s.set_defaults(func=cmd_serve)

    h = sub.add_parser("http", help="run the OpenAI-compatible HTTP gateway in front of the daemon (docs/HTTP.md)")
    log_flags(h)
    h.set_defaults(func=cmd_http)

    def client_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--endpoint", help=f"daemon address (default: from --config, else {DEFAULT_ENDPOINT})")
        sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply (default: 30)")
        sp.add_argument("--retries", type=int, default=3, help="attempts before giving up (default: 3)")
        sp.add_argument(
            "--server-key",
            help="CURVE: the daemon's device-identity.json, a file holding its Z85 public key, or z85:KEY",
        )
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
    a.add_argument(
        "--system",
        help="system message (chat models); on a session give it with the first turn only, as each turn's "
        "messages are added to the conversation",
    )
    a.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as plain text, not as a chat message (the default when the model has a chat template)",
    )
    a.add_argument(
        "--reasoning",
        choices=["separate", "hide", "inline"],
        default="separate",
        help="R1-style <think> reasoning: to stderr apart from the answer (default), hidden, or inline as written",
    )
    client_flags(a)
    a.set_defaults(func=cmd_ask)

    for name, text in (
        ("health", "daemon health: audit store, queue, uptime"),
        ("info", "model id, version, engine and limits"),
    ):
        sp = sub.add_parser(name, help=text)
        client_flags(sp)
        sp.set_defaults(func=cmd_simple)

    r = sub.add_parser(
        "reload",
        help="load the installed bundle in the running daemon; exits non-zero if it fails (the unit's ExecReload=)",
    )
    r.add_argument("--pid", type=int, help="the daemon's pid (default: $MAINPID, set by systemd)")
    r.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the outcome (default: 240)")
    r.set_defaults(func=cmd_reload)

    m = sub.add_parser("metrics", help="Prometheus metrics in text format (needs a CURVE client with role admin)")
    client_flags(m)
    m.set_defaults(func=cmd_metrics)

    k = sub.add_parser("client-keygen", help="make a CURVE key pair for a client and print its allow-list entry")
    k.add_argument("--out", required=True, help="directory for client.key (0600) and client.pub")
    k.add_argument("--name", required=True, help="the client's name in the allow-list and the audit log")
    k.add_argument(
        "--role",
        default="infer",
        choices=["infer", "admin", "gateway"],
        help="allow-list role; gateway: the HTTP gateway, trusted to name its end users (default: infer)",
    )
    k.set_defaults(func=cmd_client_keygen)

    hr = sub.add_parser("http-reload", help="make the running gateway re-read its API key file (ExecReload=)")
    hr.add_argument("--pid", type=int, help="the gateway's pid (default: $MAINPID, set by systemd)")
    hr.set_defaults(func=cmd_http_reload)
    hk = sub.add_parser("http-keygen", help="mint an API key for the HTTP gateway and print its key-file entry")
    hk.add_argument("--name", required=True, help="the key's name: its identity in the audit log (1..40 characters)")
    hk.add_argument("--role", default="infer", choices=["infer", "admin"], help="role of the key (default: infer)")
    hk.set_defaults(func=cmd_http_keygen)

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
    from appliance.errors import ApplianceError
    from appliance.logs import error_prefix
    from provisioning.errors import ProvisioningError, report_unexpected

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ApplianceError, ProvisioningError) as exc:
        print(f"{error_prefix()}edge-appliance: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: the traceback and a request to report it, at priority err under journald
        return report_unexpected("edge-appliance", journal=bool(error_prefix()))


if __name__ == "__main__":
    sys.exit(main())
