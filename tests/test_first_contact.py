"""What a new operator meets first: a config mistake is one line naming the file, key, expected type and value;
roles wider than ``infer`` need CURVE; each CLI prints its own errors as one line and a bug as a traceback with a
request to report it; ``edge-provision status`` needs no trust store; the locks pin everything with hashes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config, tomllib
from tests.conftest import BIN, run_cli

REPO = Path(__file__).resolve().parents[1]
BASE = '[paths]\nstate_dir = "state"\ntrust_dir = "trust"\naudit_db = "audit.db"\n'


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(BASE + extra + "\n")
    return path


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ('[engine]\nmax_batch = "4"', '[engine] max_batch must be an integer, got a string (max_batch = "4")'),
        ('[engine]\nload_pieces = "8"', '[engine] load_pieces must be an integer, got a string (load_pieces = "8")'),
        ("[engine]\nspin = 1", "[engine] spin must be true or false, got an integer (spin = 1)"),
        ("[audit]\naggregate_s = true", "[audit] aggregate_s must be a number, got a boolean (aggregate_s = true)"),
        ('[server]\nendpoints = "tcp://*:5555"', "[server] endpoints must be an array of strings, got a string"),
        ('[server]\nendpoints = ["tcp://*:5555", 7]', "[server] endpoints must be an array of strings, got an array"),
        ("[http]\nkeys = 5", "[http] keys must be a string, got an integer (keys = 5)"),
        ("key_dir = 3", "[paths] key_dir must be a string, got an integer (key_dir = 3)"),
        ("[paths]\nkey_dir = 3", "invalid TOML: Cannot declare ('paths',) twice"),
    ],
)
def test_a_value_of_the_wrong_type_names_file_key_type_and_value(tmp_path, extra, line):
    path = write(tmp_path, extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and line.lower() in str(err.value).lower() and "\n" not in str(err.value)


def test_a_float_key_takes_an_integer_and_types_that_fit_load(tmp_path):
    config = load_config(write(tmp_path, "[http]\ntimeout_s = 5\n[engine]\nmax_batch = 2\nspin = false"))
    assert config.http.timeout_s == 5 and config.engine.max_batch == 2 and config.engine.spin is False


@pytest.mark.parametrize("role", ["gateway", "admin"])
def test_a_wider_anonymous_role_without_curve_is_refused(tmp_path, role):
    with pytest.raises(ConfigError, match=f'anonymous_role = "{role}" is refused with curve = false'):
        load_config(write(tmp_path, f'[auth]\nanonymous_role = "{role}"'))


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[engine]\nmax_batch = "4"', "max_batch"),
        ('[engine]\nload_pieces = "8"', "load_pieces"),
        ('[auth]\nanonymous_role = "gateway"', "anonymous_role"),
    ],
)
def test_the_daemon_refuses_to_start_with_one_line_naming_the_key(tmp_path, extra, key):
    proc = subprocess.run(
        [str(BIN / "edge-appliance"), "--config", str(write(tmp_path, extra)), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, lines


def test_an_edge_models_error_is_one_line_and_a_bug_is_a_traceback_asking_for_a_report(tmp_path, capsys, monkeypatch):
    from edge_models import cli

    assert cli.main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-models: error: no checkpoint at") and "\n" not in err

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_export", broken)
    assert cli.main(["export", "--model", "m", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "edge-models: internal error: KeyError" in err and "please report" in err


def test_an_unexpected_daemon_error_says_it_is_a_bug(tmp_path, capsys, monkeypatch):
    from appliance import cli

    monkeypatch.setattr(cli, "load_config", lambda path: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setenv("EDGE_APPLIANCE_CONFIG", str(write(tmp_path, "")))
    assert cli.main(["health"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        "edge-appliance: internal error: RuntimeError"
    )


def test_provision_status_works_without_a_trust_store_and_verifies_with_one(device, tmp_path):
    bare = run_cli("edge-provision", "status", "--state", str(device.state))
    shown = __import__("json").loads(bare.stdout)
    assert shown["model_id"] == "tiny" and shown["signature"].startswith("not checked")
    checked = __import__("json").loads(
        run_cli("edge-provision", "status", "--state", str(device.state), "--trust", str(device.trust)).stdout
    )
    assert checked["bundle_id"] == shown["bundle_id"] and checked["signature"].startswith("verified")
    empty = tmp_path / "no-keys"
    empty.mkdir()
    refused = run_cli("edge-provision", "status", "--state", str(device.state), "--trust", str(empty), check=False)
    assert refused.returncode == 1 and "no trusted vendor keys" in refused.stderr  # asked to verify: fails closed


LOCKS = REPO / "provisioning" / "locks"


@pytest.mark.parametrize("name", ["runtime.txt", "dev.txt", "bench.txt", "pip.txt"])
def test_every_locked_requirement_is_exact_and_hashed(name):
    entries = [e for e in (LOCKS / name).read_text().replace("\\\n", " ").splitlines() if e and not e.startswith("#")]
    entries = [e.split("#", 1)[0].strip() for e in entries]
    assert entries
    for entry in filter(None, entries):
        assert re.match(r"^[A-Za-z0-9_.\-\[\]]+==\S+", entry) and "--hash=sha256:" in entry, entry


def test_pyproject_upper_bounds_are_the_locked_versions():
    """pyproject's ranges end at the newest tested release: the version the dev lock installs."""
    from packaging.requirements import Requirement

    locked = {}
    for line in (LOCKS / "bench.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line):
            locked[m.group(1).lower().replace("_", "-")] = m.group(2).split("+")[0]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("build", "torch", "dev", "bench"):
        reqs += project["optional-dependencies"][extra]
    for text in reqs:
        req = Requirement(text)
        name = req.name.lower().replace("_", "-")
        if name not in locked:  # tomli: Python 3.10 only, locked in runtime.txt
            assert req.marker is not None, text
            continue
        tops = [s.version for s in req.specifier if s.operator in ("<=", "==")]
        assert tops == [locked[name]], f"{text}: the newest tested release is {locked[name]}"


def test_a_server_key_is_a_file_or_an_explicit_inline_key_never_a_guess(tmp_path):
    import zmq

    from appliance.transport.auth import AuthConfigError, server_public_key

    public = zmq.curve_keypair()[0].decode()
    assert server_public_key(f"z85:{public}") == public.encode()
    (tmp_path / "daemon.pub").write_text(public + "\n")
    assert server_public_key(str(tmp_path / "daemon.pub")) == public.encode()
    with pytest.raises(AuthConfigError, match="cannot read the daemon's public key file"):
        server_public_key(public)  # 40 characters, no file of that name: not taken for a key
    missing = tmp_path / "device-identity.json"
    with pytest.raises(AuthConfigError, match=str(missing)):
        server_public_key(str(missing))
    with pytest.raises(AuthConfigError, match="not a CURVE public key"):
        server_public_key("z85:tooshort")
    config = load_config(write(tmp_path, f'[http]\nserver_key = "z85:{public}"'))
    assert config.http.server_key == f"z85:{public}"  # an inline key is not resolved as a path
