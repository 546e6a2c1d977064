"""Install into A/B slots: verify first, refuse downgrades, idempotent, rollback."""

from __future__ import annotations

import pytest

from provisioning.errors import InstallError, IntegrityError
from provisioning.install import current_bundle, install, rollback
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
