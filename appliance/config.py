"""Daemon configuration (TOML). Relative paths are resolved against the config file's directory."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from appliance.errors import ApplianceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson JetPack 6 ships Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG = Path("/etc/edge-appliance/appliance.toml")
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
ENGINE_KINDS = ("auto", "onnxruntime", "torch", "tensorrt")
SPECULATIVE_MODES = ("off", "ngram", "draft", "auto")


class ConfigError(ApplianceError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    max_message_bytes: int = 1 << 20  # one request frame; up to 4x this is answered too_large, beyond drops the link
    rcvhwm: int = 16  # messages queued per connection before libzmq stops reading from it
    max_per_client: int = 16  # requests one client identity may have running or queued at once
    max_connections_per_client: int = 4  # connections one CURVE key may hold open (each buffers rcvhwm frames)
    turn_budget_ms: float = 20.0  # time the loop spends reading requests before serving replies and the watchdog


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "auto"  # auto | onnxruntime | torch | tensorrt (appliance.engine.select)
    threads: int = 0
    max_batch: int = 4
    max_queued: int = 64
    max_seq_len: int = 512
    max_new_tokens: int = 256
    prefill_chunk: int = 256  # prompt tokens fed per step at most, so long prompts never stall decodes
    spin: bool = True  # ONNX Runtime worker threads spin between ops (lower latency, busier cores)
    affinity: str = ""  # ONNX Runtime intra-op thread affinities, e.g. "1;2" (empty: not pinned)
    load_pieces: int = 8  # sessions a model with external weights is built as: lower load peak, ~1 run more per step
    response_cache: int = 256  # identical deterministic requests answered from memory (0 disables)
    quantize: str = "none"  # torch engine: weight-only none | int8 | int4, applied at load
    # literal: special-token texts inside chat message contents are tokenized as text (no forged turns);
    # parse: as the tokenizer reads any text (transformers' apply_chat_template default)
    content_special_tokens: str = "literal"
    # Speculative decoding (docs/INFERENCE.md): off | ngram (prompt lookup) | draft (the bundle's draft model) |
    # auto (draft when the bundle carries one, else ngram). Tokens are identical either way.
    speculative: str = "auto"
    draft_tokens: int = 4  # most tokens drafted per step (adaptive below it)
    speculative_max_batch: int = 1  # speculate only while at most this many requests decode


@dataclass(frozen=True)
class SessionConfig:
    max_mb: int = 256  # total KV cache kept for conversations
    ttl_s: float = 600.0  # a conversation idle this long is forgotten
    max_sessions: int = 1024
    max_per_identity: int = 64  # sessions one client identity keeps; its own oldest is evicted past this


@dataclass(frozen=True)
class AuditConfig:
    store: str = "sqlite"  # "none" only for benchmarks: nothing is audited
    content: str = "hash"  # hash | encrypted | none
    recipient: str | None = None  # reviewer's identity file or raw X25519 key, for content = "encrypted"
    checkpoint_every: int = 100  # rows between signed checkpoints
    aggregate_s: float = 10.0  # identical refusals from one peer within this interval become one row with a count
    aggregate_unauthenticated_s: float = 60.0  # refusals of parties without a verified identity: one global budget


@dataclass(frozen=True)
class AuthConfig:
    curve: bool = False  # CurveZMQ encryption + client allow-list on every endpoint
    clients: str | None = None  # allow-list TOML (relative to the config file)
    anonymous_role: str = "infer"  # role of every connection when CURVE is off


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 0  # Prometheus scrape port on `address`; 0 = off (the admin-only `metrics` op always works)
    address: str = "127.0.0.1"
    token_file: str | None = None  # a file holding a bearer token scrapers must send (relative to this config)


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible gateway (``edge-appliance http``), a client of the daemon with role ``gateway``."""

    listen: str = DEFAULT_HTTP_LISTEN  # "host:port", or "unix:/path/to/socket"
    keys: str | None = None  # API key file (hashes only; `edge-appliance http-keygen` prints entries)
    daemon: str | None = None  # the daemon's ZeroMQ endpoint (default: the first of [server] endpoints)
    client_key: str | None = None  # the gateway's CURVE secret key (its public key is allow-listed as "gateway")
    server_key: str | None = None  # the daemon's CURVE public key: device-identity.json, a file holding it, or z85:KEY
    tls_cert: str | None = None  # PEM certificate chain: serve HTTPS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates signed by it
    timeout_s: float = 60.0  # longest wait for the daemon's next reply
    max_connections: int = 64  # requests in flight at once; more are answered 503 at once
    max_per_source: int = 16  # requests in flight from one client address; more are answered 429
    header_timeout_s: float = 10.0  # a request's head must arrive in full within this; also the keep-alive idle limit
    body_timeout_s: float = 30.0  # the whole body must arrive within this (then 408)
    keep_alive_requests: int = 1000  # requests on one connection before the server closes it
    max_open_connections: int = 256  # TCP connections open at once, idle included; more are closed unread
    max_open_per_source: int = 32  # of them from one client address
    max_header_bytes: int = 16 << 10  # the request line and headers together
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class Config:
    state_dir: Path
    trust_dir: Path
    key_dir: Path | None
    audit_db: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    source: Path | None = None


_SECTIONS = {
    "server": ServerConfig,
    "engine": EngineConfig,
    "audit": AuditConfig,
    "auth": AuthConfig,
    "sessions": SessionConfig,
    "metrics": MetricsConfig,
    "http": HttpConfig,
}
_TOP = {"state_dir", "trust_dir", "key_dir", "audit_db"}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _toml_type(value: object) -> str:
    """How TOML spells the type of a parsed value, for error messages."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return "an array" if isinstance(value, list) else "a table" if isinstance(value, dict) else type(value).__name__


def _fits(value: object, hint: object) -> bool:
    """Whether a TOML value has the declared field type (``bool`` is not an ``int``; an ``int`` is a ``float``)."""
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # tuple[str, ...]: a TOML array of that type
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    return any(_fits(value, a) for a in args if a is not type(None))  # X | None: None has no TOML spelling


def _expected(hint: object) -> str:
    if typing.get_origin(hint) is tuple:
        return f"an array of {_expected(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint]
    return " or ".join(_expected(a) for a in typing.get_args(hint) if a is not type(None))


def _typed_section(path: Path, name: str, cls: type, values: dict) -> object:
    """``cls(**values)`` after checking every value against its field's declared type (one line per mistake)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in values and not _fits(values[f.name], hints[f.name]):
            value = values[f.name]
            raise ConfigError(
                f"{path}: [{name}] {f.name} must be {_expected(hints[f.name])}, got {_toml_type(value)} "
                f"({f.name} = {json.dumps(value)})"
            )
    if "endpoints" in values:
        values["endpoints"] = tuple(values["endpoints"])
    return cls(**values)


def config_path(args: argparse.Namespace) -> Path:
    """The config file a command line names: ``--config``, else ``$EDGE_APPLIANCE_CONFIG``, else the default."""
    return Path(args.config or os.environ.get("EDGE_APPLIANCE_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path) -> Config:
    """Parse and validate ``path``; unknown keys are errors (a typo must not silently change behaviour)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    base = path.parent.resolve()
    paths = data.get("paths", {})
    unknown = set(paths) - _TOP
    if unknown or set(data) - {"paths", *_SECTIONS}:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown | (set(data) - {'paths', *_SECTIONS}))}")
    for required in ("state_dir", "trust_dir", "audit_db"):
        if required not in paths:
            raise ConfigError(f"{path}: [paths] {required} is required")
    for key, value in paths.items():
        if not isinstance(value, str):
            got = f"{_toml_type(value)} ({key} = {json.dumps(value)})"
            raise ConfigError(f"{path}: [paths] {key} must be a string, got {got}")
    sections = {}
    for name, cls in _SECTIONS.items():
        values = dict(data.get(name, {}))
        bad = set(values) - set(cls.__dataclass_fields__)
        if bad:
            raise ConfigError(f"{path}: unknown keys in [{name}]: {sorted(bad)}")
        sections[name] = _typed_section(path, name, cls, values)

    def resolve(p: str | None) -> Path | None:
        return None if p is None else (base / p).resolve()

    engine = sections["engine"]
    if engine.speculative not in SPECULATIVE_MODES:
        raise ConfigError(f"{path}: [engine] speculative must be {'|'.join(SPECULATIVE_MODES)}")
    if not 1 <= engine.draft_tokens <= 16 or engine.speculative_max_batch < 0:
        raise ConfigError(f"{path}: [engine] draft_tokens must be 1..16 and speculative_max_batch >= 0")
    if engine.content_special_tokens not in ("literal", "parse"):
        raise ConfigError(f"{path}: [engine] content_special_tokens must be literal or parse")
    if engine.kind not in ENGINE_KINDS or engine.quantize not in ("none", "int8", "int4"):
        raise ConfigError(f"{path}: [engine] kind must be {'|'.join(ENGINE_KINDS)} and quantize none|int8|int4")
    if not 1 <= engine.load_pieces <= 64:
        raise ConfigError(f"{path}: [engine] load_pieces must be 1..64 (1: one session, the fastest decode)")
    audit = sections["audit"]
    if audit.recipient:
        audit = AuditConfig(**{**audit.__dict__, "recipient": str(resolve(audit.recipient))})
    if audit.store not in ("sqlite", "none") or audit.content not in ("hash", "encrypted", "none"):
        raise ConfigError(f"{path}: [audit] store must be sqlite|none and content hash|encrypted|none")
    auth = sections["auth"]
    if auth.curve and not auth.clients:
        raise ConfigError(f'{path}: [auth] curve = true needs clients = "<allow-list file>"')
    from appliance.serving.roles import ROLES

    if auth.anonymous_role not in ROLES:
        raise ConfigError(f"{path}: [auth] anonymous_role must be one of {'|'.join(ROLES)}")
    if not auth.curve and auth.anonymous_role != "infer":
        # Without CURVE, every local process is anonymous: a wider role would let any of them administer the daemon
        # or (gateway) name any identity in on_behalf_of. A site that wants more allow-lists keys under CURVE.
        role = auth.anonymous_role
        raise ConfigError(
            f'{path}: [auth] anonymous_role = "{role}" is refused with curve = false (any local process could act '
            f'with that role); set it to "infer", or turn curve on and allow-list a key with role "{role}"'
        )
    if auth.clients:
        auth = AuthConfig(curve=auth.curve, clients=str(resolve(auth.clients)), anonymous_role=auth.anonymous_role)
    http = sections["http"]
    files = ("keys", "client_key", "server_key", "tls_cert", "tls_key", "tls_client_ca")
    paths_in = {k: getattr(http, k) for k in files if getattr(http, k) and not getattr(http, k).startswith("z85:")}
    http = HttpConfig(**{**http.__dict__, **{k: str(resolve(v)) for k, v in paths_in.items()}})
    if bool(http.tls_cert) != bool(http.tls_key) or (http.tls_client_ca and not http.tls_cert):
        raise ConfigError(f"{path}: [http] TLS needs tls_cert and tls_key (tls_client_ca only with them)")
    limits = ("timeout_s", "header_timeout_s", "body_timeout_s", "max_connections", "max_per_source")
    limits += (
        "keep_alive_requests",
        "max_header_bytes",
        "max_body_bytes",
        "max_open_connections",
        "max_open_per_source",
    )
    for name in limits:
        if getattr(http, name) <= 0:
            raise ConfigError(f"{path}: [http] {name} must be greater than 0 (it is {getattr(http, name)})")
    metrics = sections["metrics"]
    if metrics.token_file:
        metrics = MetricsConfig(**{**metrics.__dict__, "token_file": str(resolve(metrics.token_file))})
    return Config(
        state_dir=resolve(paths["state_dir"]),
        trust_dir=resolve(paths["trust_dir"]),
        key_dir=resolve(paths.get("key_dir")),
        audit_db=resolve(paths["audit_db"]),
        server=sections["server"],
        engine=sections["engine"],
        audit=audit,
        auth=auth,
        sessions=sections["sessions"],
        metrics=metrics,
        http=http,
        source=path,
    )


def render_config(
    state_dir: str, trust_dir: str, key_dir: str, audit_db: str, endpoint: str = DEFAULT_ENDPOINT, max_batch: int = 4
) -> str:
    """A commented config file for a new device (what ``edge-appliance init`` writes)."""
    return f"""# edge-appliance daemon configuration. Relative paths are relative to this file.
[paths]
state_dir = "{state_dir}"   # installed bundles: slots/a, slots/b, current -> slots/X
trust_dir = "{trust_dir}"   # trusted vendor public keys (*.pub)
key_dir = "{key_dir}"       # device private keys (0600); $CREDENTIALS_DIRECTORY is tried first
audit_db = "{audit_db}"     # SQLite audit log

[server]
endpoints = ["{endpoint}"]
max_message_bytes = 1048576    # one request frame
rcvhwm = 16                 # messages queued per connection
max_per_client = 16         # requests one client may have running or queued
max_connections_per_client = 4  # connections one CURVE key may hold; more are answered busy
turn_budget_ms = 20         # loop time spent reading requests before replies and the watchdog

[engine]
kind = "auto"               # auto: TensorRT plan for this GPU > torch on CUDA > onnxruntime (CPU); or name one
# quantize = "int8"         # torch engine only: weight-only int8 | int4 at load (default none)
# content_special_tokens = "literal"  # chat contents never become special tokens; "parse" reads them as markup
speculative = "auto"        # speculative decoding: auto (the bundle's draft model, else n-gram) | draft | ngram | off
draft_tokens = 4            # most tokens drafted per step; speculation only while <= speculative_max_batch decode
speculative_max_batch = 1
threads = 0                 # 0 = automatic: one per 16 MB of weights read per token, at most the cores
max_batch = {max_batch}     # sequences decoded together
max_queued = 64             # waiting requests before answering 'busy'
max_seq_len = 512           # prompt + generated tokens per sequence
max_new_tokens = 256        # upper bound a request may ask for
prefill_chunk = 256         # prompt tokens per step at most: long prompts never stall running decodes
spin = true                 # ONNX Runtime workers spin between ops: lower latency, busier cores
# affinity = "1;2"          # pin ONNX Runtime's intra-op workers (threads - 1 entries)
load_pieces = 8             # load as this many sessions: peak ~1.5x the weights instead of ~2x, decode 2-18 % slower
                            # (more on small models); 1 where memory allows
response_cache = 256        # identical greedy/seeded requests answered from memory (0 = off)

[sessions]
max_mb = 256                # KV cache kept for conversations (`session` field), least recently used evicted
ttl_s = 600                 # idle conversations are forgotten after this
max_sessions = 1024
max_per_identity = 64       # one client's sessions; past this its own oldest is evicted, never another client's

[audit]
content = "hash"            # hash (digests only) | encrypted (sealed for `recipient`) | none
# recipient = "reviewer-identity.json"   # the hospital reviewer's key, needed for content = "encrypted"
checkpoint_every = 100      # rows between checkpoints signed with the device's Ed25519 key
aggregate_s = 10            # identical refusals from one peer within this interval: one row with a count
aggregate_unauthenticated_s = 60  # unknown keys, failed handshakes, bad API keys: 1 row + 1 count row per reason

[auth]
curve = false               # true: CurveZMQ on every endpoint, only allow-listed client keys served
# clients = "clients.toml"  # [[client]] name = "...", key = "<Z85 public key>", role = "infer" | "admin"
anonymous_role = "infer"    # role of every connection when CURVE is off; only "infer" is accepted there

[metrics]
port = 0                    # Prometheus scrape port on 127.0.0.1 (0 = off); the `metrics` op needs role admin
# token_file = "metrics.token"  # scrapers send `Authorization: Bearer <token>`; at most 8 scrapes at once, 5 s each

[http]                      # `edge-appliance http`: OpenAI-compatible gateway (docs/HTTP.md); needs curve = true
listen = "127.0.0.1:8080"   # "host:port" or "unix:/run/edge-appliance-http/http.sock"
# keys = "http-keys.toml"   # API key hashes: `edge-appliance http-keygen --name NAME` prints an entry
# client_key = "credentials/gateway.key"   # the gateway's CURVE secret; allow-list its key with role "gateway"
# server_key = "device-identity.json"      # the daemon's CURVE public key
# tls_cert = "http-cert.pem"               # serve HTTPS (with tls_key); tls_client_ca requires client certificates
"""
