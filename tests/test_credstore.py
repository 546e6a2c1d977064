"""Root tools fall back to the credential sealed by `enroll --credstore`, with errors that say what to do.

Sealing and unsealing for real (systemd-creds with the host key) is exercised by the acceptance boot.
"""

from __future__ import annotations

import shutil

import pytest

from provisioning.errors import KeyMaterialError
from provisioning.keys import DEVICE_X25519, read_private


def test_missing_key_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("EDGE_APPLIANCE_CREDSTORE", str(tmp_path / "credstore"))
    with pytest.raises(KeyMaterialError) as err:
        read_private(DEVICE_X25519, tmp_path / "keys")
    message = str(err.value)
    assert str(tmp_path / "keys" / DEVICE_X25519) in message and str(tmp_path / "credstore" / DEVICE_X25519) in message


@pytest.mark.skipif(
    shutil.which("systemd-creds") is None, reason="systemd-creds not installed (.ci/run installs systemd)"
)
def test_a_credential_that_does_not_unseal_is_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    store = tmp_path / "credstore"
    store.mkdir()
    (store / DEVICE_X25519).write_bytes(b"not a sealed credential")
    monkeypatch.setenv("EDGE_APPLIANCE_CREDSTORE", str(store))
    with pytest.raises(KeyMaterialError, match=r"cannot unseal .*device-x25519.key with systemd-creds"):
        read_private(DEVICE_X25519, tmp_path / "keys")
