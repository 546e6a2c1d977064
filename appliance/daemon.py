"""``edge-appliance serve``: load, warm up, announce READY=1, serve until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from appliance.audit import AuditLog
from appliance.config import Config, ConfigError
from appliance.engine.ort_engine import map_large_allocations
from appliance.loader import LoadedModel, load_model
from appliance.metrics import METRICS
from appliance.notify import Notifier
from appliance.transport.server import BindError, Server
from provisioning.keys import DEVICE_ED25519, load_ed25519, load_public_x25519, make_undumpable

log = logging.getLogger("appliance.daemon")


def metrics_token(config: Config) -> str | None:
    """The bearer token of ``[metrics] token_file`` (resolved against the config file when loaded), or None."""
    if not config.metrics.token_file:
        return None
    path = Path(config.metrics.token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"[metrics] token_file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(f"[metrics] token_file {path}: the token must be at least 16 characters")
    return token


def warm_up(model: LoadedModel) -> float:
    """One prefill and one decode step so the first real request does not pay allocation costs."""
    start = time.monotonic()
    engine = model.engine
    engine.prefill([(0, [model.spec.pad_token_id] * 8)])
    engine.decode([(0, model.spec.pad_token_id)])
    engine.release(0)
    return time.monotonic() - start


def open_audit(config: Config, *, for_writing: bool = True) -> AuditLog | None:
    """The configured audit store, with the device's signing key and the content policy."""
    cfg = config.audit
    if cfg.store == "none":
        if for_writing:
            log.warning('AUDIT DISABLED ([audit] store = "none"): requests are not recorded; for benchmarks only')
        return None
    recipient = load_public_x25519(Path(cfg.recipient)) if cfg.recipient else None
    signing = load_ed25519(DEVICE_ED25519, config.key_dir) if for_writing else None
    return AuditLog(
        config.audit_db,
        content=cfg.content,
        recipient=recipient,
        signing_key=signing,
        checkpoint_every=cfg.checkpoint_every,
    )


def run_daemon(config: Config) -> int:
    if make_undumpable():  # before any key or model byte is in memory
        log.info("process not dumpable: no core dumps, no ptrace or /proc/PID/mem reads by other processes")
    else:
        log.warning("could not make the process undumpable (not Linux?): core dumps may contain the model")
    if not map_large_allocations():  # before the model: reloads then give the previous model's memory back
        log.warning("could not set the C allocator's mmap threshold (not glibc?): reloads may grow the process")
    notifier = Notifier()
    notifier.status("opening audit log")
    audit = open_audit(config)
    notifier.status("decrypting model")
    t0 = time.monotonic()
    model = load_model(config)
    METRICS.model_loaded(model.model_id, model.version, time.monotonic() - t0)
    log.info(
        "loaded model %s v%d (%s, engine %s) in %.2fs",
        model.model_id,
        model.version,
        model.spec.architecture,
        model.engine.kind,
        time.monotonic() - t0,
    )
    log.info("warm-up took %.3fs", warm_up(model))
    server = Server(config, model, audit, notifier)
    del model  # the server owns it now: a reload must be able to free it (this frame lives as long as the daemon)
    if config.metrics.port:
        address = f"{config.metrics.address}:{config.metrics.port}"
        try:
            METRICS.serve_http(config.metrics.port, config.metrics.address, metrics_token(config))
        except OSError as exc:
            raise BindError(f"cannot serve metrics on {address}: {exc.strerror}; change [metrics] port") from None

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        server.stop_event.set()

    def on_reload(_signum: int, _frame: object) -> None:
        server.reload_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_reload)
    endpoints = ", ".join(config.server.endpoints)
    notifier.ready(server.status_line())
    log.info("ready: listening on %s", endpoints)
    log.info(
        'query it with: edge-appliance ask "How do I reset the conveyor?" --endpoint %s', config.server.endpoints[0]
    )
    try:
        server.serve_forever()
    finally:
        if audit is not None:
            audit.checkpoint_now()
            audit.close()
    log.info("stopped cleanly")
    return 0
