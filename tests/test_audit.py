"""Audit log on real SQLite files: chain, signed checkpoints, content policies, tamper detection by row,
migration from schema 1, export / verify-export / prune."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.audit import GENESIS, AuditLog, Entry, Filters, row_hash
from appliance.audit.export import ExportError, check_against_exports, export, prune, reveal, verify_export
from appliance.audit.schema import SCHEMA_VERSION

DEVICE = Ed25519PrivateKey.generate()
PUBLIC = DEVICE.public_key()


def fill(path, n=10, **kwargs) -> AuditLog:
    log = AuditLog(path, signing_key=DEVICE, checkpoint_every=kwargs.pop("checkpoint_every", 4), **kwargs)
    for i in range(n):  # one commit per request, as a lightly loaded daemon writes them
        log.record(
            Entry(
                request_id=f"r{i}",
                op="generate",
                status="ok",
                prompt=f"patient {i} has a fever",
                output=f"o{i}",
                prompt_tokens=i,
                completion_tokens=2 * i,
                total_s=0.01 * i,
                client=f"c{i % 2}",
                model_version=1 + i // 5,
            )
        )
    return log


def sql(path, *statements):
    con = sqlite3.connect(path)
    for st in statements:
        con.execute(st)
    con.commit()
    con.close()


def db_bytes(path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_rows_are_chained_and_checkpoints_signed(tmp_path):
    log = fill(tmp_path / "a.db")
    rows = log.rows()
    assert [r.seq for r in rows] == list(range(1, 11))
    assert rows[0].prev_hash == GENESIS and all(rows[i].prev_hash == rows[i - 1].row_hash for i in range(1, 10))
    result = log.verify(PUBLIC)
    assert result.ok and result.rows == 10 and result.checkpoints == 2  # at rows 4 and 8


def test_group_commit_and_reopen_continue_the_chain(tmp_path):
    fill(tmp_path / "a.db", 3).close()
    log = fill(tmp_path / "a.db", 3)
    assert [r.seq for r in log.rows()] == [1, 2, 3, 4, 5, 6] and log.verify(PUBLIC).ok
    assert sqlite3.connect(tmp_path / "a.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_list_filters(tmp_path):
    log = fill(tmp_path / "a.db")
    assert {r.client for r in log.rows(Filters(client="c1"))} == {"c1"}
    assert [r.model_version for r in log.rows(Filters(model_version=2))] == [2] * 5
    assert len(log.rows(Filters(limit=3))) == 3 and log.rows(Filters(limit=3))[-1].seq == 10
    assert log.rows(Filters(since=log.rows()[-1].ts + 1)) == []


def test_hash_policy_stores_digests_only(tmp_path):
    fill(tmp_path / "a.db").close()
    assert b"fever" not in db_bytes(tmp_path / "a.db")
    row = AuditLog(tmp_path / "a.db").rows()[0]
    assert row.prompt_sha256 == hashlib.sha256(b"patient 0 has a fever").hexdigest()


def test_none_policy_stores_nothing_about_content(tmp_path):
    log = fill(tmp_path / "a.db", 2, content="none")
    assert all(r.prompt_sha256 is None and r.output_sha256 is None for r in log.rows())
    assert log.verify(PUBLIC).ok


def test_encrypted_policy_only_the_reviewer_can_read(tmp_path):
    reviewer = X25519PrivateKey.generate()
    log = fill(tmp_path / "a.db", 5, content="encrypted", recipient=reviewer.public_key())
    log.close()
    assert b"fever" not in db_bytes(tmp_path / "a.db")
    log = AuditLog(tmp_path / "a.db", signing_key=DEVICE)
    assert log.verify(PUBLIC).ok
    out = export(log, tmp_path / "usb", DEVICE, "dev").path
    rows = reveal(out, PUBLIC, reviewer)
    assert [r["prompt"] for r in rows] == [f"patient {i} has a fever" for i in range(5)]
    from provisioning.errors import RecipientError

    with pytest.raises(RecipientError):
        reveal(out, PUBLIC, X25519PrivateKey.generate())


@pytest.mark.parametrize(
    "tamper, expected",
    [
        ("UPDATE audit_log SET completion_tokens = 99 WHERE seq = 3", "row 3: contents do not match its hash: edited"),
        ("UPDATE audit_log SET client = 'someone-else' WHERE seq = 7", "row 7: contents do not match"),
        ("DELETE FROM audit_log WHERE seq = 5", "row 5 missing before row 6: deleted"),
    ],
)
def test_database_tampering_is_named(tmp_path, tamper, expected):
    fill(tmp_path / "a.db").close()
    sql(tmp_path / "a.db", tamper)
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and result.message.startswith(expected), result.message


def test_swapped_rows_are_reported_as_reordered(tmp_path):
    fill(tmp_path / "a.db").close()
    sql(
        tmp_path / "a.db",
        "UPDATE audit_log SET seq = -1 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE seq = -1",
    )
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and result.message.startswith("row 3: prev_hash does not match row 2: reordered")


def test_inserted_row_is_named_even_with_a_recomputed_hash(tmp_path):
    fill(tmp_path / "a.db").close()
    con = sqlite3.connect(tmp_path / "a.db")
    cols = [c[1] for c in con.execute("PRAGMA table_info(audit_log)")]
    row2 = dict(zip(cols, con.execute("SELECT * FROM audit_log WHERE seq = 2").fetchone(), strict=True))
    for seq in range(10, 2, -1):
        con.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq + 1, seq))
    fake = {**row2, "seq": 3, "request_id": "forged", "prev_hash": row2["row_hash"]}
    fake["row_hash"] = row_hash(row2["row_hash"], fake)
    con.execute(
        f"INSERT INTO audit_log ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", [fake[c] for c in cols]
    )
    con.commit()
    con.close()
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and result.message.startswith("row 4: prev_hash does not match row 3"), result.message


def test_truncated_tail_is_caught_by_the_signed_checkpoint(tmp_path):
    log = fill(tmp_path / "a.db")
    log.checkpoint_now()  # what the daemon does at shutdown
    log.close()
    sql(tmp_path / "a.db", "DELETE FROM audit_log WHERE seq >= 9")
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and result.message.startswith("rows 9..10 missing"), result.message


def test_rewritten_chain_fails_checkpoint_signature(tmp_path):
    """An attacker who edits a row and recomputes every later hash still cannot re-sign checkpoints."""
    fill(tmp_path / "a.db").close()
    con = sqlite3.connect(tmp_path / "a.db")
    cols = [c[1] for c in con.execute("PRAGMA table_info(audit_log)")]
    rows = [dict(zip(cols, r, strict=True)) for r in con.execute("SELECT * FROM audit_log ORDER BY seq")]
    rows[1]["completion_tokens"] = 0
    prev = GENESIS
    for r in rows:
        r["prev_hash"], r["row_hash"] = prev, row_hash(prev, r)
        prev = r["row_hash"]
        con.execute(
            "UPDATE audit_log SET completion_tokens=?, prev_hash=?, row_hash=? WHERE seq=?",
            (r["completion_tokens"], r["prev_hash"], r["row_hash"], r["seq"]),
        )
    con.commit()
    con.close()
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and "checkpoint at row 4 does not match the chain" in result.message


V1_DDL = """
CREATE TABLE audit_meta (key VARCHAR(32) PRIMARY KEY, value VARCHAR(256) NOT NULL);
CREATE TABLE audit_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts FLOAT NOT NULL, request_id VARCHAR(64) NOT NULL,
  client VARCHAR(64) NOT NULL, role VARCHAR(16) NOT NULL, op VARCHAR(16) NOT NULL, model_id VARCHAR(128),
  model_version INTEGER, prompt_sha256 VARCHAR(64), output_sha256 VARCHAR(64), prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL, queue_ms FLOAT, ttft_ms FLOAT, total_ms FLOAT, status VARCHAR(16) NOT NULL,
  error_code VARCHAR(32), finish_reason VARCHAR(16), prev_hash VARCHAR(64) NOT NULL,
  row_hash VARCHAR(64) NOT NULL UNIQUE);
CREATE INDEX ix_audit_log_ts ON audit_log (ts);
CREATE INDEX ix_audit_log_request_id ON audit_log (request_id);
CREATE INDEX ix_audit_log_status ON audit_log (status);
INSERT INTO audit_meta VALUES ('schema_version', '1');
"""


def test_schema_1_database_upgrades_in_place_with_rows_intact(tmp_path):
    """A database as the first release wrote it (schema 1, its DDL and chain rule) upgrades and verifies."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(V1_DDL)
    prev = GENESIS
    for i in range(1, 6):
        fields = {
            "seq": i,
            "ts": 1700000000.0 + i,
            "request_id": f"old{i}",
            "client": "anonymous",
            "role": "infer",
            "op": "generate",
            "model_id": "m",
            "model_version": 1,
            "prompt_sha256": "ab" * 32,
            "output_sha256": "cd" * 32,
            "prompt_tokens": i,
            "completion_tokens": i,
            "queue_ms": 1.0,
            "ttft_ms": 2.0,
            "total_ms": 3.0,
            "status": "ok",
            "error_code": None,
            "finish_reason": "eos",
        }
        digest = row_hash(prev, fields)
        con.execute(
            f"INSERT INTO audit_log ({','.join(fields)}, prev_hash, row_hash) VALUES "
            f"({','.join('?' * (len(fields) + 2))})",
            [*fields.values(), prev, digest],
        )
        prev = digest
    con.commit()
    con.close()
    log = AuditLog(path, signing_key=DEVICE)
    assert sqlite3.connect(path).execute("SELECT value FROM audit_meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert [r.request_id for r in log.rows()] == [f"old{i}" for i in range(1, 6)]
    log.record(Entry(request_id="new", op="generate", status="ok", prompt="p"))
    assert log.verify(PUBLIC).ok and log.rows()[-1].prev_hash == prev


def test_newer_schema_is_refused(tmp_path):
    from appliance.audit import AuditError

    fill(tmp_path / "a.db", 1).close()
    sql(tmp_path / "a.db", "UPDATE audit_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(AuditError, match="newer than this software"):
        AuditLog(tmp_path / "a.db")


# -- export ---------------------------------------------------------------------------------------


def test_incremental_exports_verify_alone_and_together(tmp_path):
    log = fill(tmp_path / "a.db", 6)
    first = export(log, tmp_path / "usb", DEVICE, "dev")
    assert (first.from_seq, first.to_seq) == (1, 6)
    assert export(log, tmp_path / "usb", DEVICE, "dev").path is None  # nothing new
    log.record_many([Entry(request_id=f"n{i}", op="generate", status="ok") for i in range(3)])
    second = export(log, tmp_path / "usb", DEVICE, "dev")
    assert (second.from_seq, second.to_seq) == (7, 9)
    assert verify_export(first.path, PUBLIC).ok and verify_export(second.path, PUBLIC).ok
    both = verify_export(tmp_path / "usb", PUBLIC)
    assert both.ok and both.rows == 9, both.message


@pytest.fixture
def exported(tmp_path):
    log = fill(tmp_path / "a.db", 8)
    return export(log, tmp_path / "usb", DEVICE, "dev").path


def lines(path):
    return (path / "rows.jsonl").read_text().splitlines(keepends=True)


@pytest.mark.parametrize(
    "tamper, expected",
    [
        ("edit", "row 3: contents do not match its hash: edited"),
        ("drop", "row 5 missing before row 6: deleted"),
        ("reorder", "row 5 missing before row 6: reordered"),
        ("truncate", "rows end at 6, manifest says 8: truncated"),
    ],
)
def test_export_tampering_is_named(exported, tamper, expected):
    rows = lines(exported)
    if tamper == "edit":
        row = json.loads(rows[2])
        row["status"] = "error"
        rows[2] = json.dumps(row) + "\n"
    elif tamper == "drop":
        del rows[4]
    elif tamper == "reorder":
        rows[4], rows[5] = rows[5], rows[4]
    else:
        rows = rows[:6]
    (exported / "rows.jsonl").write_text("".join(rows))
    result = verify_export(exported, PUBLIC)
    assert not result.ok and expected in result.message, result.message


def test_export_signature_replaced_or_wrong_device(exported):
    assert not verify_export(exported, Ed25519PrivateKey.generate().public_key()).ok
    forged = Ed25519PrivateKey.generate().sign((exported / "manifest.json").read_bytes())
    (exported / "manifest.sig").write_bytes(forged)
    result = verify_export(exported, PUBLIC)
    assert not result.ok and "bad signature" in result.message


def test_edited_manifest_fails_signature(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    manifest["count"] = 7
    (exported / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    assert "bad signature" in verify_export(exported, PUBLIC).message


def test_pulled_stick_leaves_nothing_that_verifies_and_export_resumes(tmp_path):
    log = fill(tmp_path / "a.db", 5)
    usb = tmp_path / "usb"
    done = export(log, usb, DEVICE, "dev")
    partial = usb / f".partial-{done.path.name}"
    shutil.copytree(done.path, partial)  # what a pull between writing files and the rename leaves
    (partial / "manifest.sig").unlink()
    shutil.rmtree(done.path)
    with pytest.raises(ExportError, match="incomplete export"):
        from appliance.audit.export import read_export

        read_export(partial, PUBLIC)
    again = export(log, usb, DEVICE, "dev", since_seq=1)
    assert verify_export(again.path, PUBLIC).ok and not partial.exists()


def test_prune_removes_only_exported_rows_and_keeps_the_chain(tmp_path):
    log = fill(tmp_path / "a.db", 8)
    export(log, tmp_path / "usb", DEVICE, "dev")
    log.record_many([Entry(request_id=f"late{i}", op="generate", status="ok") for i in range(2)])
    result = prune(log, exported_before=log.rows()[-1].ts + 10, signing_key=DEVICE)
    assert (result.removed, result.anchor_seq) == (8, 8)
    assert [r.seq for r in log.rows()] == [9, 10]
    assert log.verify(PUBLIC).ok
    sql(tmp_path / "a.db", "DELETE FROM audit_log WHERE seq = 9")
    assert AuditLog(tmp_path / "a.db").verify(PUBLIC).message.startswith("row 9 missing")


# -- item 4: prune only below the last row contiguous exports hold --------------------------------


def test_prune_refuses_rows_no_contiguous_export_holds(tmp_path):
    log = fill(tmp_path / "a.db", 120, checkpoint_every=10)
    export(log, tmp_path / "usb", DEVICE, "dev", since_seq=100)  # rows 100..120 only: 1..99 never exported
    result = prune(log, exported_before=log.rows()[-1].ts + 10, signing_key=DEVICE)
    assert (result.removed, result.exported_to) == (0, 0)
    assert len(log.rows()) == 120 and log.verify(PUBLIC).ok
    export(log, tmp_path / "usb", DEVICE, "dev", since_seq=1)  # the gap filled: now 1..120 are held
    assert prune(log, exported_before=log.rows()[-1].ts + 10, signing_key=DEVICE).removed == 120


def test_prune_stops_at_the_first_gap_between_exports(tmp_path):
    log = fill(tmp_path / "a.db", 30, checkpoint_every=10)
    export(log, tmp_path / "usb", DEVICE, "dev", since_seq=1)
    log.record_many([Entry(request_id=f"n{i}", op="generate", status="ok") for i in range(20)])
    export(log, tmp_path / "usb", DEVICE, "dev", since_seq=41)  # rows 31..40 skipped
    result = prune(log, exported_before=log.rows()[-1].ts + 10, signing_key=DEVICE)
    assert (result.removed, result.anchor_seq, result.exported_to) == (30, 30, 30)
    assert log.rows()[0].seq == 31 and log.verify(PUBLIC).ok


# -- item 5: chained checkpoints, signed anchor, signed position, gaps in a series ------------------


def test_verify_reports_the_signed_position_and_the_unsigned_rows_after_it(tmp_path):
    log = fill(tmp_path / "a.db", 25, checkpoint_every=10)
    result = log.verify(PUBLIC)
    assert result.ok and (result.signed_upto, result.unsigned) == (20, 5)
    assert "signed up to row 20, 5 row(s) after it unsigned" in result.message
    log.checkpoint_now()
    assert (log.verify(PUBLIC).signed_upto, log.verify(PUBLIC).unsigned) == (25, 0)


def test_deleting_a_checkpoint_between_others_breaks_the_checkpoint_chain(tmp_path):
    fill(tmp_path / "a.db", 40, checkpoint_every=10).close()
    sql(tmp_path / "a.db", "DELETE FROM audit_checkpoints WHERE upto_seq = 20")
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and result.message.startswith(
        "checkpoint at row 30 does not follow the checkpoint before it (row 10): checkpoints deleted"
    ), result.message


def test_deleting_later_checkpoints_leaves_the_rows_reported_unsigned(tmp_path):
    log = fill(tmp_path / "a.db", 120, checkpoint_every=10)
    log.checkpoint_now()
    log.close()
    sql(tmp_path / "a.db", "DELETE FROM audit_checkpoints WHERE upto_seq > 100")
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert (result.signed_upto, result.unsigned) == (100, 20), result.message


def test_log_cut_back_with_its_checkpoints_is_caught_by_the_reviewers_export(tmp_path):
    """The attack from the review: rows 101..120 and their checkpoints deleted. The device alone cannot
    tell this from a log that ended at 100; the export the reviewer holds can."""
    log = fill(tmp_path / "a.db", 120, checkpoint_every=10)
    export(log, tmp_path / "reviewer", DEVICE, "dev")
    log.close()
    sql(
        tmp_path / "a.db",
        "DELETE FROM audit_log WHERE seq > 100",
        "DELETE FROM audit_checkpoints WHERE upto_seq > 100",
        "DELETE FROM audit_exports",
    )
    log = AuditLog(tmp_path / "a.db")
    assert log.verify(PUBLIC).ok  # consistent as far as the disk can tell...
    assert check_against_exports(log, tmp_path / "reviewer", PUBLIC) == [
        "the log ends at row 100 but export audit-dev-000000001-000000120, signed by this device, reaches row 120: "
        "rows 101..120 were cut"
    ]


def test_forged_prune_anchor_is_detected(tmp_path):
    """Rows 1..120 deleted and an anchor written by hand at row 120 (no device key to sign it)."""
    fill(tmp_path / "a.db", 130, checkpoint_every=10).close()
    con = sqlite3.connect(tmp_path / "a.db")
    head = con.execute("SELECT row_hash FROM audit_log WHERE seq = 120").fetchone()[0]
    con.close()
    sql(
        tmp_path / "a.db",
        "DELETE FROM audit_log WHERE seq <= 120",
        "DELETE FROM audit_checkpoints WHERE upto_seq <= 120",
        "INSERT INTO audit_meta VALUES ('anchor_seq', '120')",
        f"INSERT INTO audit_meta VALUES ('anchor_hash', '{head}')",
    )
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and result.message.startswith("prune anchor at row 120 is not signed"), result.message
    sql(tmp_path / "a.db", f"INSERT INTO audit_meta VALUES ('anchor_signature', '{'ab' * 64}')")
    result = AuditLog(tmp_path / "a.db").verify(PUBLIC)
    assert not result.ok and "prune anchor at row 120: bad signature: forged" in result.message


def test_signed_anchor_after_prune_verifies_and_the_checkpoint_chain_continues(tmp_path):
    log = fill(tmp_path / "a.db", 25, checkpoint_every=10)
    export(log, tmp_path / "usb", DEVICE, "dev")
    assert prune(log, exported_before=log.rows()[-1].ts + 10, signing_key=DEVICE).anchor_seq == 25
    log.record_many([Entry(request_id=f"n{i}", op="generate", status="ok") for i in range(10)])
    result = log.verify(PUBLIC)
    assert result.ok and (result.rows, result.checkpoints, result.signed_upto) == (10, 1, 35), result.message
    second = export(log, tmp_path / "usb", DEVICE, "dev")
    assert verify_export(tmp_path / "usb", PUBLIC).ok and second.from_seq == 26


def test_missing_export_in_a_series_is_reported_with_every_gap(tmp_path):
    log = fill(tmp_path / "a.db", 5)
    usb = tmp_path / "usb"
    paths = [export(log, usb, DEVICE, "dev").path]
    for batch in range(4):
        log.record_many([Entry(request_id=f"b{batch}-{i}", op="generate", status="ok") for i in range(5)])
        paths.append(export(log, usb, DEVICE, "dev").path)
    assert verify_export(usb, PUBLIC).ok
    shutil.rmtree(paths[1])  # rows 6..10
    shutil.rmtree(paths[3])  # rows 16..20
    result = verify_export(usb, PUBLIC)
    assert not result.ok
    assert "rows 6..10 missing before audit-dev-000000011-000000015: an export is missing" in result.message
    assert "rows 16..20 missing before audit-dev-000000021-000000025: an export is missing" in result.message


V3_CHECKPOINT = b"edge-appliance/audit-checkpoint/v1"


def test_schema_3_database_upgrades_and_its_checkpoints_chain_on(tmp_path):
    """A database as schema 3 wrote it: unchained checkpoints signed with the v1 message, no link column."""
    path = tmp_path / "v3.db"
    log = AuditLog(path, checkpoint_every=4)  # no signing key: rows only
    for i in range(10):
        log.record(Entry(request_id=f"r{i}", op="generate", status="ok"))
    log.close()
    con = sqlite3.connect(path)
    for upto in (4, 8):
        head = con.execute("SELECT row_hash FROM audit_log WHERE seq = ?", (upto,)).fetchone()[0]
        ts = 1700000000.0 + upto
        message = V3_CHECKPOINT + json.dumps([upto, head, ts], separators=(",", ":")).encode()
        con.execute(
            "INSERT INTO audit_checkpoints (upto_seq, head_hash, ts, signature) VALUES (?, ?, ?, ?)",
            (upto, head, ts, DEVICE.sign(message).hex()),
        )
    con.execute("ALTER TABLE audit_checkpoints DROP COLUMN prev_checkpoint")
    con.execute("UPDATE audit_meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    log = AuditLog(path, signing_key=DEVICE, checkpoint_every=4)
    assert sqlite3.connect(path).execute("SELECT value FROM audit_meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    before = log.verify(PUBLIC)
    assert before.ok and (before.checkpoints, before.signed_upto, before.unsigned) == (2, 8, 2), before.message
    for i in range(6):
        log.record(Entry(request_id=f"new{i}", op="generate", status="ok"))
    after = log.verify(PUBLIC)
    assert after.ok and (after.checkpoints, after.signed_upto) == (4, 16), after.message
    sql(path, "DELETE FROM audit_checkpoints WHERE upto_seq = 8")  # the last legacy one: the chain notices
    assert "does not follow the checkpoint before it" in AuditLog(path).verify(PUBLIC).message


def test_log_deleted_and_started_again_contradicts_the_exports_held(tmp_path):
    log = fill(tmp_path / "a.db", 6)
    usb = tmp_path / "usb"
    export(log, usb, DEVICE, "dev")
    log.close()
    for f in tmp_path.glob("a.db*"):
        f.unlink()  # the whole database removed; the daemon starts a new chain at row 1
    log = fill(tmp_path / "a.db", 8)
    assert log.verify(PUBLIC).ok
    export(log, usb / "later", DEVICE, "dev")
    shutil.move(str(next((usb / "later").iterdir())), usb / "audit-dev-000000001-000000008-b")
    result = verify_export(usb, PUBLIC)
    assert not result.ok and "row 1 differs between" in result.message, result.message


def test_audit_cli_prunes_only_exported_rows_and_checks_against_the_exports(tmp_path):
    from appliance.config import render_config
    from provisioning.keys import DEVICE_ED25519, load_ed25519
    from tests.conftest import run_cli

    run_cli("edge-provision", "enroll", "--keys", str(tmp_path / "keys"), "--out", str(tmp_path / "id.json"))
    config = tmp_path / "appliance.toml"
    config.write_text(render_config("state", "trust", "keys", "audit.db"))
    key = load_ed25519(DEVICE_ED25519, tmp_path / "keys")
    log = AuditLog(tmp_path / "audit.db", signing_key=key, checkpoint_every=10)
    log.record_many([Entry(request_id=f"r{i}", op="generate", status="ok") for i in range(30)])
    log.close()
    audit = ["edge-appliance", "--config", str(config), "audit"]
    run_cli(*audit, "export", "--to", str(tmp_path / "usb"), "--since-seq", "11")
    pruned = run_cli(*audit, "prune", "--exported-before", "2100-01-01").stdout
    assert "removed 0 exported row(s)" in pruned and "rows after 0 are not in a contiguous series" in pruned
    run_cli(*audit, "export", "--to", str(tmp_path / "usb"), "--since-seq", "1")
    assert "removed 30 exported row(s)" in run_cli(*audit, "prune", "--exported-before", "2100-01-01").stdout
    verify = [*audit, "verify", "--device-key", str(tmp_path / "id.json"), "--against", str(tmp_path / "usb")]
    assert run_cli(*verify).stdout.startswith("OK: 0 rows (seq 31..30)")
    sql(tmp_path / "audit.db", "UPDATE audit_meta SET value = '40' WHERE key = 'anchor_seq'")
    forged = run_cli(*verify, check=False)
    assert forged.returncode == 1 and "prune anchor at row 40: bad signature" in forged.stdout
    assert "Traceback" not in forged.stderr
