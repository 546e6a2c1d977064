"""Install into A/B slots: copy once, verify the copy, refuse links, downgrades per model id, idempotent, rollback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from provisioning.errors import InstallError, IntegrityError, UnsafeFileError
from provisioning.install import current_bundle, install, read_install_log, read_versions, rollback, verify_fully
from tests.test_bundle import flip_byte, make_bundle, parties, payload  # noqa: F401 - fixture


def test_install_switches_slots_and_rolls_back(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    v3, _ = make_bundle(tmp_path, vendor, device, "v3")
    first = install(v3, state, trusted, device)
    assert (first.slot, first.changed) == ("a", True)
    assert install(v3, state, trusted, device).changed is False  # same bundle again: no-op
    v4, _ = make_bundle(tmp_path, vendor, device, "v4", version=4)
    second = install(v4, state, trusted, device)
    assert second.slot == "b" and current_bundle(state, trusted).version == 4
    assert (state / "current").resolve() == (state / "slots" / "b").resolve()
    assert rollback(state) == "a"
    assert current_bundle(state, trusted).version == 3


def test_downgrade_refused_unless_allowed(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    v3, _ = make_bundle(tmp_path, vendor, device, "v3")
    install(v3, state, trusted, device)
    other, _ = make_bundle(tmp_path, vendor, device, "v3b")  # also version 3, different bundle
    with pytest.raises(InstallError, match="not newer"):
        install(other, state, trusted, device)
    assert install(other, state, trusted, device, allow_downgrade=True).slot == "b"


def test_tampered_bundle_never_touches_the_state(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    bad, _ = make_bundle(tmp_path, vendor, device, "bad")
    flip_byte(payload(bad, "model.onnx"), 100)
    with pytest.raises(IntegrityError):
        install(bad, state, trusted, device)
    assert not state.exists()


def test_rollback_without_previous_is_refused(tmp_path):
    (tmp_path / "state").mkdir()
    with pytest.raises(InstallError, match="no previous slot"):
        rollback(tmp_path / "state")


# -- item 2: install exactly what was verified -----------------------------------------------------


def swap_in(stick: Path, other: Path) -> None:
    """Overwrite every file of the stick, in place, with another validly signed bundle (a hostile stick's trick)."""
    for path in other.rglob("*"):
        if path.is_file():
            (stick / path.relative_to(other)).write_bytes(path.read_bytes())


@pytest.mark.parametrize("when", ["after the manifest was read", "after everything was read"])
def test_stick_changed_between_reads_never_installs_unverified_content(tmp_path, parties, when):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    v2, _ = make_bundle(tmp_path, vendor, device, "v2", version=2)
    install(v2, state, trusted, device)
    v1, _ = make_bundle(tmp_path, vendor, device, "v1", version=1)
    stick, _ = make_bundle(tmp_path, vendor, device, "stick", version=3)
    v3_manifest = (stick / "manifest.json").read_bytes()
    calls: list[tuple[int, int]] = []

    def swap(done: int, total: int) -> None:
        calls.append((done, total))
        if (when == "after the manifest was read" and len(calls) == 1) or (
            when == "after everything was read" and done == total
        ):
            swap_in(stick, v1)

    if when == "after the manifest was read":
        with pytest.raises(IntegrityError, match="SHA-256 differs"):
            install(stick, state, trusted, device, progress=swap)
        assert current_bundle(state, trusted).version == 2
        assert not list((state / "slots").glob(".*staging"))
    else:
        result = install(stick, state, trusted, device, progress=swap)
        installed = current_bundle(state, trusted)
        assert result.version == installed.version == 3
        assert (installed.root / "manifest.json").read_bytes() == v3_manifest
        verify_fully(installed, device)


def test_symlink_on_the_stick_is_refused_even_when_its_target_is_genuine(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    stick, _ = make_bundle(tmp_path, vendor, device, "stick")
    enc = payload(stick, "model.onnx")
    genuine = tmp_path / "elsewhere.enc"
    enc.rename(genuine)
    enc.symlink_to(genuine)  # same bytes, so every hash would match if the link were followed
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        install(stick, tmp_path / "state", trusted, device)
    assert not (tmp_path / "state").exists()


def test_fifo_on_the_stick_is_refused_without_blocking(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    stick, _ = make_bundle(tmp_path, vendor, device, "stick")
    enc = payload(stick, "decoder.json")
    enc.unlink()
    os.mkfifo(enc)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        install(stick, tmp_path / "state", trusted, device)


def test_files_the_manifest_does_not_list_are_not_copied(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    secret = tmp_path / "device-x25519.key"
    secret.write_bytes(os.urandom(32))
    stick, _ = make_bundle(tmp_path, vendor, device, "stick")
    (stick / "notes.txt").symlink_to(secret)
    (stick / "payload" / "999.enc").write_bytes(b"unsigned extra")
    result = install(stick, tmp_path / "state", trusted, device)
    slot = tmp_path / "state" / "slots" / result.slot
    copied = sorted(str(p.relative_to(slot)) for p in slot.rglob("*"))
    listed = sorted(f["path"] for f in json.loads((stick / "manifest.json").read_text())["files"])
    assert copied == sorted(["manifest.json", "manifest.sig", "payload", *listed])


# -- item 3: version counters per model id; replacing the model needs a flag and is logged ----------


def test_another_model_id_needs_replace_model_and_is_logged(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    real_v2, _ = make_bundle(tmp_path, vendor, device, "real-v2", version=2)
    install(real_v2, state, trusted, device)
    other, _ = make_bundle(tmp_path, vendor, device, "other", version=1_900_000_000, model_id="x")
    with pytest.raises(InstallError, match="--replace-model"):
        install(other, state, trusted, device)
    assert current_bundle(state, trusted).model_id == "m"
    assert install(other, state, trusted, device, replace_model=True).replaced_model == "m"
    # The other model's huge version does not block the real model: counters are per model id.
    real_v3, _ = make_bundle(tmp_path, vendor, device, "real-v3", version=3)
    assert install(real_v3, state, trusted, device, replace_model=True).version == 3
    # ...and the real model's own counter still refuses its older versions.
    real_v1, _ = make_bundle(tmp_path, vendor, device, "real-v1", version=1)
    with pytest.raises(InstallError, match="not newer than version 3"):
        install(real_v1, state, trusted, device)
    log = read_install_log(state)
    assert [(e["action"], e["model_id"], e["version"]) for e in log] == [
        ("install", "m", 2),
        ("replace-model", "x", 1_900_000_000),
        ("replace-model", "m", 3),
    ]
    assert log[1]["previous"] == {"model_id": "m", "version": 2}


def test_rollback_does_not_reset_the_version_counter(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    v3, _ = make_bundle(tmp_path, vendor, device, "v3")
    v4, _ = make_bundle(tmp_path, vendor, device, "v4", version=4)
    install(v3, state, trusted, device)
    install(v4, state, trusted, device)
    rollback(state)
    other_v4, _ = make_bundle(tmp_path, vendor, device, "other-v4", version=4)
    with pytest.raises(InstallError, match="not newer than version 4"):
        install(other_v4, state, trusted, device)
    assert install(v4, state, trusted, device).version == 4  # the bundle that set the counter may return
    assert read_install_log(state)[2]["action"] == "rollback"


def test_counters_of_a_state_from_before_them_are_read_from_its_slots(tmp_path, parties):  # noqa: F811
    vendor, device, trusted = parties
    state = tmp_path / "state"
    v4, _ = make_bundle(tmp_path, vendor, device, "v4", version=4)
    install(v4, state, trusted, device)
    (state / "versions.json").unlink()  # the layout before per-model counters existed
    bundle_id = json.loads((v4 / "manifest.json").read_text())["bundle_id"]
    assert read_versions(state, trusted) == {"m": {"version": 4, "bundle_id": bundle_id}}
