"""Decrypted model bytes do not outlive the engine build, and the daemon cannot be dumped or read by its peers."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

from appliance.config import load_config
from appliance.loader import load_model


def reachable_copies(length: int, prefix: bytes) -> list[str]:
    """Types of the objects that reference a bytes/bytearray of ``length`` starting with ``prefix``.

    bytes and bytearray are not tracked by the garbage collector, so they are found as the
    referents of every object that is (dicts, instances' __dict__, lists, frames, closures ...).
    """
    holders = []
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            if isinstance(ref, (bytes, bytearray)) and len(ref) == length and ref[: len(prefix)] == prefix:
                holders.append(type(obj).__name__)
    return holders


def test_no_python_object_references_the_decrypted_model_after_load(device, tiny_build):
    plain = (tiny_build / "onnx" / "model.onnx").read_bytes()
    length, prefix = len(plain), plain[:256]
    del plain  # the test's own copy: not part of what is checked
    model = load_model(load_config(device.config))
    try:
        assert getattr(model.engine.session, "_model_bytes", None) is None
        gc.collect()
        assert reachable_copies(length, prefix) == []
        assert model.engine.prefill([(0, [model.spec.bos_token_id] * 4)]) is not None  # the engine still works
    finally:
        model.engine.release(0)


OBSERVER = textwrap.dedent(
    """
    import ctypes, sys
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    # Drop every capability (root's CAP_SYS_PTRACE included): what remains is the same-user check,
    # which the kernel refuses for a process that is not dumpable.
    assert libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) == 0, ctypes.get_errno()
    try:
        open(f"/proc/{sys.argv[1]}/environ", "rb").read()
        print("readable")
    except PermissionError:
        print("denied")
    """
)


def peer_can_read(pid: int) -> str:
    return subprocess.run(
        [sys.executable, "-c", OBSERVER, str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_DUMPABLE) is Linux only")
def test_running_daemon_is_not_dumpable(daemon):
    control = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert peer_can_read(control.pid) == "readable"  # an ordinary process of the same user
    finally:
        control.communicate(b"")
    assert peer_can_read(daemon.proc.pid) == "denied"
