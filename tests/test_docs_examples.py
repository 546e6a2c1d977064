"""The code blocks a user is told to run, run: every fenced ``python`` and ``bash`` block of README.md,
docs/HTTP.md and docs/PROTOCOL.md is either executed here against a demo device or skipped by name with the
reason (and the test that covers the same commands). A new block must be classified, or
``test_every_block_is_classified`` fails, so no example is silently untested.

Each block runs as printed, in a directory laid out like the checkout after ``make run`` (``.venv/bin``,
``.demo/appliance.toml``, ``.demo/device-identity.json``), with only these substitutions: the daemon's and the
gateway's addresses (the tests' own free ports, not 5555/8080), the placeholder API key ``ea-...``, the model id
(``tiny`` here) and the scratch directory ``/tmp/usb``. Commands without ``--config`` find the daemon through
``EDGE_APPLIANCE_CONFIG`` (as on a device whose config is not at the default path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_models.reference_tokenizers import R1_DISTILL_TEMPLATE
from tests.conftest import BIN, Daemon, http_site, provision_device, templated_build, wait_for_rows

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/HTTP.md", "docs/PROTOCOL.md")
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)

# (doc, the block's name: the first 60 characters of its first line) -> where it runs: "demo" (the demo device,
# CURVE off, as `make run` leaves it), "chat" (the demo weights sealed with DeepSeek-R1's chat template), "http"
# (CURVE on, the gateway in front).
QUERY = ("README.md", '.venv/bin/edge-appliance ask "How do I reset the conveyor?"  ')
CURL = ("docs/HTTP.md", "KEY=ea-...   # from http-keygen")
RAW_ZMQ = ("docs/PROTOCOL.md", "import msgpack, zmq")
RUN = {
    QUERY: "demo",
    ("README.md", "from appliance.client import Client"): "demo",
    ("README.md", 'edge-appliance ask "Which valve is V-12?" --system "You maint'): "chat",
    ("README.md", "from openai import OpenAI"): "http",
    CURL: "http",
    ("docs/HTTP.md", "from openai import OpenAI"): "http",
    RAW_ZMQ: "demo",
}
# What an example's output must show beyond exit status 0 and a new audited generation (the tiny model's text
# itself is mostly whitespace, so the text is not checked).
EXPECT = {
    QUERY: ('"status": "ok"', '"model_id": "tiny"', "chain intact", "OK: 1 export(s)"),
    CURL: ('{"status": "ok"}', '"object": "list"', "data: [DONE]", '"param": "n"'),
    RAW_ZMQ: ("'type': 'done'",),
}
# The README's Python blocks share their first line; these lines tell them apart: (where it runs, expected output).
BY_CONTENT = {
    'messages=[{"role": "user", "content": "Which valve is V-12?"}]': ("chat", ()),
    'session="line-7"': ("demo", ("{'ended': True",)),  # and the second turn came from the kept context (below)
    "json_schema=ticket": ("demo", ('{"machine":"',)),
}
SKIP = {
    ("README.md", "edge-models export --gguf DeepSeek-R1-Distill-Qwen-1.5B-Q8_0."): (
        "needs a user's GGUF file and manuals; the same commands run on the real SmolLM2 GGUF from the package "
        "registry in tests/test_real_weights.py (export --gguf, eval --onnx, seal/install/serve)"
    ),
    ("README.md", "make run    # set up .venv, build the demo model (first time ~"): (
        "`make test` is this suite and `make run` builds the full demo (~5 min): both are run on a fresh clone by "
        "CI (.ci/run runs make test) and before each release"
    ),
    ("README.md", "edge-appliance client-keygen --out ~/press4 --name press-line"): (
        "between its two lines the printed entry is added to the allow-list and the daemon restarted; "
        "tests/conftest.py http_site runs the same client-keygen and a CURVE client with the key"
    ),
    ("README.md", "edge-provision wheelhouse --out /media/usb/wheelhouse --signi"): (
        "a USB stick and the network; tests/acceptance/test_boot.py builds the same wheelhouse, "
        "tests/test_wheelhouse.py checks it"
    ),
    ("README.md", "sh /media/usb/wheelhouse/install-offline.sh /opt/edge-applian"): (
        "a USB stick and a device; tests/acceptance/test_boot.py runs it in a booted Debian with no network"
    ),
    ("README.md", "edge-provision enroll --keys /etc/edge-appliance/keys --out /"): (
        "systemd-creds on a device; tests/acceptance/test_boot.py runs it under a booted systemd"
    ),
    ("README.md", "edge-provision keygen --vendor ~/vendor-keys                 "): (
        "a USB stick with two enrolled devices' identities; tests/conftest.py provision_device runs the same "
        "keygen and seal, tests/acceptance/test_boot.py with the stick"
    ),
    ("README.md", "edge-provision verify /media/usb/plant-assistant-v7 --keys /e"): (
        "root paths and systemctl on a device; tests/acceptance/test_boot.py runs these steps under a booted systemd"
    ),
    ("docs/HTTP.md", "edge-appliance client-keygen --out /root/gateway --name http-"): (
        "systemd-creds and systemctl on a device; tests/conftest.py http_site makes the same keys and starts the "
        "same two processes"
    ),
    ("docs/HTTP.md", "curl --cacert ca.pem --cert ehr.pem --key ehr.key https://app"): (
        "a TLS or Unix-socket gateway config; tests/test_http.py runs both (client certificates, unix: listen)"
    ),
    ("docs/HTTP.md", ".venv/bin/python bench/http_bridge.py --config .demo/applianc"): (
        "a benchmark (minutes); `make bench` runs it"
    ),
}

# Names are cut at 60 characters (see key()); a name given longer above is cut the same way.
RUN, EXPECT, SKIP = ({(d, f[:60]): v for (d, f), v in table.items()} for table in (RUN, EXPECT, SKIP))


def key(text: str) -> str:
    """A block's name: the first 60 characters of its first line."""
    return text.strip().splitlines()[0][:60]


def blocks() -> list[tuple[str, str, str, str]]:
    """(doc, language, name, text) of every fenced python/bash block."""
    found = []
    for doc in DOCS:
        for lang, text in FENCE.findall((REPO / doc).read_text()):
            found.append((doc, lang, key(text), text))
    return found


def where(doc: str, first: str, text: str) -> str | None:
    if (doc, first) in RUN:
        return next((kind for line, (kind, _) in BY_CONTENT.items() if line in text), RUN[(doc, first)])
    return None


def expected(doc: str, text: str) -> tuple[str, ...]:
    return EXPECT.get((doc, key(text)), ()) + sum((e for line, (_, e) in BY_CONTENT.items() if line in text), ())


def test_every_block_is_classified():
    unclassified = [(d, f) for d, _, f, t in blocks() if where(d, f, t) is None and (d, f) not in SKIP]
    assert not unclassified, f"new doc examples: add them to RUN or SKIP (with the reason) {unclassified}"
    stale = (set(RUN) | set(SKIP)) - {(d, f) for d, _, f, _ in blocks()}
    assert not stale, f"these blocks are gone from the docs: {stale}"


@pytest.fixture(scope="module")
def sites(tiny_build, tmp_path_factory):
    """The three devices the examples run on, each with its daemon (and the gateway) running."""
    root = tmp_path_factory.mktemp("docs")
    demo = provision_device(tiny_build, root / "demo")
    chat = provision_device(
        tiny_build, root / "chat", onnx=templated_build(tiny_build, "onnx-chat", R1_DISTILL_TEMPLATE)
    )
    daemons = [Daemon(demo, root / "demo-run"), Daemon(chat, root / "chat-run")]
    try:
        for d in daemons:
            d.wait_for("READY=1")
        with http_site(tiny_build, root / "http") as site:
            yield {"demo": demo, "chat": chat, "http": site}
    finally:
        for d in daemons:
            d.stop()


def checkout(tmp: Path, device) -> Path:
    """A directory laid out as the checkout is after `make run`: .venv/bin and .demo/ (the device's files)."""
    work = tmp / "checkout"
    work.mkdir()
    (work / ".venv").symlink_to(BIN.parent)
    (work / ".demo").symlink_to(device.config.parent)
    identity = device.config.parent / "device-identity.json"
    if not identity.exists():
        identity.write_bytes(device.identity.read_bytes())
    return work


EXAMPLES = [
    pytest.param(d, lang, text, id=f"{d}:{f[:40]}") for d, lang, f, text in blocks() if where(d, f, text) is not None
]


@pytest.mark.parametrize(("doc", "lang", "text"), EXAMPLES)
def test_example_runs_as_printed(sites, doc, lang, text, tmp_path):
    kind = where(doc, key(text), text)
    site = sites[kind]
    device = site.device if kind == "http" else site
    subst = {
        "tcp://127.0.0.1:5555": device.endpoint,
        "/tmp/usb": str(tmp_path / "usb"),
        "demo-deepseek-v3-tiny": "tiny",
    }
    if kind == "http":
        subst.update({"127.0.0.1:8080": f"127.0.0.1:{site.port}", "localhost:8080": f"127.0.0.1:{site.port}"})
        subst["ea-..."] = site.key
    for old, new in subst.items():
        text = text.replace(old, new)
    before = len(wait_for_rows(device, lambda r: r.op == "generate" and r.status == "ok", timeout=0, at_least=0))
    env = dict(os.environ, EDGE_APPLIANCE_CONFIG=str(device.config), PATH=f"{BIN}:{os.environ['PATH']}")
    command = [sys.executable, "-c", text] if lang == "python" else ["bash", "-euo", "pipefail", "-c", text]
    proc = subprocess.run(command, cwd=checkout(tmp_path, device), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{doc} example failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    out = proc.stdout + proc.stderr
    for shown in expected(doc, text):
        assert shown in out, f"{doc} example: {shown!r} not in its output:\n{out}"
    if 'session="line-7"' in text:  # the conversation holds: turn 2's prompt tokens came from turn 1's cache
        assert int(proc.stdout.split(" prompt tokens came from")[0].split()[-1]) > 0, out
    # Served, not just exited 0: the device audited at least one more successful generation.
    served = wait_for_rows(device, lambda r: r.op == "generate" and r.status == "ok", at_least=before + 1)
    assert len(served) > before, f"{doc} example exited 0 but no generation was audited"
