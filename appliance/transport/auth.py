"""CurveZMQ authentication at the edge of the server (a ZAP handler beside the socket).

The allow-list is a TOML file of clients, each a CURVE public key (Z85) with a name and a role::

    [[client]]
    name = "press-line-4"
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    role = "infer"          # infer | admin | gateway

An unknown key fails the CURVE handshake: it gets no service at all, and the attempt is audited.
An accepted connection's messages carry ``User-Id = name:fingerprint``, which is the audit subject.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from appliance.errors import ApplianceError
from appliance.serving.roles import ROLES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


ZAP_DOMAIN = "edge-appliance"


class AuthConfigError(ApplianceError):
    pass


@dataclass(frozen=True)
class ClientEntry:
    name: str
    key: str  # Z85 public key
    role: str

    @property
    def user_id(self) -> str:
        return f"{self.name}:{key_fingerprint(self.key)}"


def key_fingerprint(z85_key: str | bytes) -> str:
    raw = zmq.utils.z85.decode(z85_key if isinstance(z85_key, bytes) else z85_key.encode())
    return hashlib.sha256(raw).hexdigest()[:16]


def load_clients(path: Path) -> dict[str, ClientEntry]:
    """Parse the allow-list; a malformed entry is an error, never silently skipped."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AuthConfigError(f"cannot read client allow-list {path}: {exc}") from None
    clients = {}
    for n, item in enumerate(data.get("client", []), 1):
        name, key, role = item.get("name"), item.get("key"), item.get("role", "infer")
        if not isinstance(name, str) or not isinstance(key, str) or len(key) != 40 or role not in ROLES:
            raise AuthConfigError(
                f"{path}: client #{n} needs name, a 40-character Z85 key and role ({'|'.join(ROLES)})"
            )
        clients[key] = ClientEntry(name, key, role)
    return clients


class _AllowList:
    def __init__(self, clients: dict[str, ClientEntry], on_deny: Callable[[str], None]):
        self.clients = clients
        self.on_deny = on_deny

    def callback(self, _domain: str, key: bytes) -> bool:
        if key.decode() in self.clients:
            return True
        self.on_deny(key.decode())
        return False


class _Authenticator(ThreadAuthenticator):
    clients: dict[str, ClientEntry] = {}

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85 = zmq.utils.z85.encode(client_public_key).decode()
        entry = self.clients.get(z85)
        return entry.user_id if entry else f"unknown:{key_fingerprint(z85)}"


def start_authenticator(
    ctx: zmq.Context, clients: dict[str, ClientEntry], on_deny: Callable[[str], None]
) -> ThreadAuthenticator:
    auth = _Authenticator(ctx)
    auth.clients = clients
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_AllowList(clients, on_deny))
    return auth


def secure_server(sock: zmq.Socket, secret_z85: bytes) -> str:
    """Make ``sock`` a CURVE server; returns its public key (Z85) for clients to pin."""
    public = zmq.curve_public(secret_z85)
    sock.curve_secretkey = secret_z85
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()
    return public.decode()


def client_keygen(out_dir: Path, name: str, role: str = "infer") -> ClientEntry:
    """A client key pair: ``client.key`` (secret, 0600) and ``client.pub``; returns its allow-list entry."""
    from provisioning.keys import write_private

    public, secret = zmq.curve_keypair()
    write_private(Path(out_dir) / "client.key", secret)
    (Path(out_dir) / "client.pub").write_bytes(public)
    return ClientEntry(name, public.decode(), role)


INLINE_KEY = "z85:"


def server_public_key(value: str) -> bytes:
    """The daemon's CURVE public key from ``z85:<40 characters>`` (inline), or a file: a device-identity.json or
    one holding the Z85 key. Never guessed: anything without the ``z85:`` prefix is a path, and a missing or
    unreadable file is an error naming it."""
    if value.startswith(INLINE_KEY):
        key = value[len(INLINE_KEY) :].strip()
        try:
            if len(key) != 40 or len(z85.decode(key)) != 32:
                raise ValueError
        except ValueError:
            raise AuthConfigError(f"{value!r} is not a CURVE public key (z85: and 40 Z85 characters)") from None
        return key.encode()
    path = Path(value)
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise AuthConfigError(
            f"cannot read the daemon's public key file {path} ({exc.strerror}); give its device-identity.json, a "
            f"file holding its Z85 key, or the key itself as {INLINE_KEY}KEY"
        ) from None
    if len(text) == 40:
        return text.encode()
    from provisioning.keys import DeviceIdentity

    return DeviceIdentity.load(path).curve_public.encode()
