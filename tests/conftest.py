"""Shared fixtures: a tiny DeepSeek-V3 demo built in seconds, a provisioned device, a running daemon."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import zmq

from appliance.audit import AuditLog
from appliance.config import load_config, render_config
from appliance.transport import api_keys
from appliance.transport.client import Client
from provisioning.keys import DeviceIdentity

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """The demo pipeline with the TINY shape and a few training steps (same code path as `make run`)."""
    from edge_models.demo import TINY_STUDENT, build_demo
    from edge_models.teacher import TINY
    from edge_models.train import TrainConfig

    reuse = os.environ.get("EDGE_TEST_BUILD")  # developers: keep one tiny build across runs
    if reuse and (Path(reuse) / "report.json").exists():
        return Path(reuse)
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("build") / "demo"
    build_demo(out, TINY, TrainConfig(steps=40, batch_size=8, seq_len=64), vocab_size=1024, student=TINY_STUDENT)
    return out


@pytest.fixture(scope="session")
def traced_teacher(tiny_build, tmp_path_factory) -> Path:
    """The tiny teacher exported by tracing transformers' modeling code (``--traced``: the path for families the fused
    builder does not cover, and the plain-ONNX graph TensorRT parses). The demo itself exports fused."""
    from transformers import AutoModelForCausalLM

    from edge_models.export import export_decoder
    from edge_models.tokenizer import copy_tokenizer_files

    out = tiny_build / "teacher-traced"
    if not (out / "decoder.json").exists():
        model = AutoModelForCausalLM.from_pretrained(tiny_build / "teacher", local_files_only=True).eval()
        export_decoder(model, out, traced=True)
        copy_tokenizer_files(tiny_build / "teacher", out)
    return out


@pytest.fixture(scope="session")
def external_build(tiny_build) -> Path:
    """The tiny student exported fused at q4 with its weights in ``model.onnx.data``: the file layout of a real-size
    model (the loader's borrowed-weights, loading-in-pieces path), small enough for tests."""
    from transformers import AutoModelForCausalLM

    from edge_models.export import export_decoder
    from edge_models.tokenizer import copy_tokenizer_files

    out = tiny_build / "onnx-external"
    if not (out / "model.onnx.data").exists():
        model = AutoModelForCausalLM.from_pretrained(tiny_build / "student" / "student", local_files_only=True)
        export_decoder(model.eval(), out, external_data=True, quant="q4")
        copy_tokenizer_files(tiny_build / "teacher", out)
    return out


@dataclass
class Device:
    root: Path
    config: Path
    state: Path
    keys: Path
    trust: Path
    vendor: Path
    identity: Path
    bundle: Path
    endpoint: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def templated_build(tiny_build: Path, name: str, template: str) -> str:
    """The demo weights with ``template`` as the chat template in tokenizer_config.json (what a checkpoint that
    ships one carries), made once as ``tiny_build / name``; returns ``name`` for ``provision_device(onnx=...)``."""
    out = tiny_build / name
    if not out.exists():
        out.mkdir()
        for f in (tiny_build / "onnx").iterdir():
            (out / f.name).write_bytes(f.read_bytes())
        config = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return name


def provision_device(
    tiny_build: Path,
    root: Path,
    version: int = 1,
    onnx: str = "onnx",
    torch: bool = False,
    kind: str = "auto",
    draft: str | None = None,
) -> Device:
    """Vendor keygen, device enroll, seal, install: the same commands `make run` uses. ``torch`` also
    seals the student's safetensors checkpoint (for the torch engine); ``kind`` is ``[engine] kind``; ``draft``
    names a directory of ``tiny_build`` sealed as the speculative-decoding draft."""
    vendor, keys, trust, state = (
        root / "vendor",
        root / "device" / "credentials",
        root / "device" / "trust",
        root / "device" / "state",
    )
    identity, bundle = root / "device-identity.json", root / f"bundle-v{version}"
    run_cli("edge-provision", "keygen", "--vendor", str(vendor))
    run_cli("edge-provision", "enroll", "--keys", str(keys), "--out", str(identity), "--device-id", "test-device")
    trust.mkdir(parents=True)
    (trust / "vendor.pub").write_bytes((vendor / "vendor-ed25519.pub").read_bytes())
    run_cli(
        "edge-provision",
        "seal",
        "--model",
        str(tiny_build / onnx),
        "--model-id",
        "tiny",
        "--version",
        str(version),
        "--signing-key",
        str(vendor / "vendor-ed25519.key"),
        "--recipient",
        str(identity),
        "--out",
        str(bundle),
        "--chunk-size",
        str(1 << 16),
        *(["--torch", str(tiny_build / "student" / "student")] if torch else []),
        *(["--draft", str(tiny_build / draft)] if draft else []),
    )
    run_cli("edge-provision", "install", str(bundle), "--state", str(state), "--trust", str(trust), "--keys", str(keys))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = root / "device" / "appliance.toml"
    text = render_config("state", "trust", "credentials", "state/audit.db", endpoint, max_batch=4)
    config.write_text(text.replace('kind = "auto"', f'kind = "{kind}"', 1))
    return Device(root, config, state, keys, trust, vendor, identity, bundle, endpoint)


@pytest.fixture(scope="session")
def device(tiny_build, tmp_path_factory) -> Device:
    return provision_device(tiny_build, tmp_path_factory.mktemp("site"))


class Daemon:
    """`edge-appliance serve` (or another long-running command) as a real subprocess, with a NOTIFY_SOCKET
    the test owns."""

    def __init__(
        self, device: Device, tmp: Path, watchdog_usec: int = 200_000, command: str = "serve", preexec_fn=None
    ):
        tmp.mkdir(parents=True, exist_ok=True)
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.5)
        self.messages: list[str] = []
        self.stamps: list[tuple[float, str]] = []  # (monotonic arrival, message), for gap checks
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), WATCHDOG_USEC=str(watchdog_usec))
        env.pop("WATCHDOG_PID", None)
        self.log = open(tmp / f"{command}.log", "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "edge-appliance"), "--config", str(device.config), command],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=tmp,  # where a core dump would land
            preexec_fn=preexec_fn,
        )
        self.endpoint = device.endpoint

    def _read_notify(self) -> None:
        """Drain the notify socket like systemd does (a full datagram queue would block the sender)."""
        while True:
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append(msg)
                self.stamps.append((time.monotonic(), msg))

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [m for m in self.messages if needle in m]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} from the daemon in {timeout}s; got {self.messages}\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()
        self.log.close()
        return self.proc.returncode


def wait_for_rows(device: Device, match, timeout: float = 15.0, at_least: int = 1) -> list:
    """Audit rows matching ``match`` once at least ``at_least`` are committed (refusals are written
    by the group-commit writer after their reply leaves)."""
    db = load_config(device.config).audit_db
    deadline = time.monotonic() + timeout
    while True:
        log = AuditLog(db)
        try:
            rows = [r for r in log.rows() if match(r)]
        finally:
            log.close()
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.fixture(scope="module")
def daemon(device, tmp_path_factory):
    d = Daemon(device, tmp_path_factory.mktemp("daemon"))
    d.wait_for("READY=1")
    yield d
    d.stop()


class Site:
    def __init__(self, device, root, daemon, gateway, port, key, admin_key):
        self.device, self.root, self.daemon, self.gateway = device, root, daemon, gateway
        self.port, self.key, self.admin_key = port, key, admin_key
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0, timeout=60)

    def zmq_client(self, **kw) -> Client:
        """The allow-listed ZeroMQ client (role infer), for comparisons and for refusals."""
        secret = (self.root / "press4" / "client.key").read_bytes()
        server = DeviceIdentity.load(self.device.identity).curve_public.encode()
        pair = (zmq.curve_public(secret), secret)
        return Client(self.device.endpoint, curve_server_key=server, curve_keypair=pair, **kw)

    def audit_rows(self, **match) -> list:
        rows = AuditLog(load_config(self.device.config).audit_db).rows()
        return [r for r in rows if all(getattr(r, k) == v for k, v in match.items())]

    def wait_for_row(self, timeout: float = 30.0, **match):
        """The audit row is committed before the daemon's final reply; poll until it is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.audit_rows(**match)
            if rows:
                return rows[-1]
            time.sleep(0.05)
        raise AssertionError(f"no audit row matching {match}")


def mint_api_key(name: str, role: str, keys_file) -> str:
    out = run_cli("edge-appliance", "http-keygen", "--name", name, "--role", role)
    with keys_file.open("a") as f:
        f.write(out.stdout.split("\n", 1)[1])  # the entry, without its comment line
    return next(line.strip() for line in out.stderr.splitlines() if line.strip().startswith(api_keys.KEY_PREFIX))


@contextlib.contextmanager
def http_site(tiny_build: Path, root: Path, http_extra: str = "", onnx: str = "onnx"):
    """A device with CURVE on, a running daemon and a running `edge-appliance http` gateway in front of it, an
    allow-listed ZeroMQ client (press4/) and two API keys (infer, admin): the set-up docs/HTTP.md describes.
    ``http_extra``: more ``[http]`` lines (limits a test tightens); ``onnx``: the build's model directory."""
    device = provision_device(tiny_build, root / "site", onnx=onnx)
    allow = []
    for name, role, out in (("press-line-4", "infer", "press4"), ("http-gateway", "gateway", "gateway")):
        text = run_cli(
            "edge-appliance", "client-keygen", "--out", str(root / out), "--name", name, "--role", role
        ).stdout
        allow.append(text[text.index("[[client]]") :])
    (device.config.parent / "clients.toml").write_text("\n".join(allow))
    keys_file = device.config.parent / "http-keys.toml"
    key, admin_key = mint_api_key("ehr-plugin", "infer", keys_file), mint_api_key("ops-console", "admin", keys_file)
    port = free_port()
    text = device.config.read_text().replace("curve = false", 'curve = true\nclients = "clients.toml"')
    text = text.replace(
        'listen = "127.0.0.1:8080"',
        f'listen = "127.0.0.1:{port}"\nkeys = "http-keys.toml"\nclient_key = "{root}/gateway/client.key"\n'
        f'server_key = "{device.identity}"\ntimeout_s = 30\n{http_extra}',
    )
    device.config.write_text(text)
    daemon = Daemon(device, root / "run")
    daemon.wait_for("READY=1")
    gateway = Daemon(device, root / "gw", command="http")
    try:
        gateway.wait_for("READY=1")
        yield Site(device, root, daemon, gateway, port, key, admin_key)
    finally:
        gateway.stop()
        daemon.stop()


def serve_in_process(model, requests: list, *, slots: int = 4, eos=None, speculator=None, sessions=None, after=None):
    """Serve ``requests`` (``protocol.Request``s of one client) on a real engine thread, no sockets; returns
    ({id: final reply}, the stopped runner). ``after``: (id, request) submitted once request ``id`` has been
    answered (a request joining mid-flight). Synchronised on the runner's wake-ups, never on sleeps."""
    from appliance.audit.writer import AuditWriter
    from appliance.serving.admission import Admission, Peer
    from appliance.serving.runner import EngineRunner
    from appliance.serving.scheduler import Scheduler
    from appliance.serving.sessions import SessionStore
    from appliance.transport import protocol as P

    sessions = sessions or SessionStore(8 << 20, 60, 8)
    admission = Admission(sessions, None, max_per_client=16)
    eos = eos if eos is not None else model.spec.eos_token_ids
    sched = Scheduler(num_slots=slots, max_queued=8, max_seq_len=model.engine.max_seq_len, eos_token_ids=eos)
    woke = threading.Event()
    runner = EngineRunner(model, sched, AuditWriter(None), wake=woke.set, sessions=sessions, speculator=speculator)
    peer = Peer("tester", "infer", b"r")
    runner.start()
    finals: dict[str, dict] = {}
    try:
        for n, req in enumerate(requests):
            assert runner.submit(admission.admit(model, req, peer, n))
        want = len(requests) + (after is not None)
        while len(finals) < want:
            assert woke.wait(60)
            woke.clear()
            while not runner.outbox.empty():
                out = runner.outbox.get()
                if out.final:
                    reply = P.decode_reply(out.frame)
                    finals[reply["id"]] = reply
                    if after is not None and reply["id"] == after[0]:
                        assert runner.submit(admission.admit(model, after[1], peer, 0))
    finally:
        runner.stop()
        runner.join(timeout=10)
    return finals, runner
