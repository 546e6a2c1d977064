"""Audit log on a real SQLite file: rows, chain verification, and tamper detection by row."""

from __future__ import annotations

import sqlite3

from appliance.audit import AuditLog, Entry


def fill(path, n=5) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.record(Entry(request_id=f"r{i}", op="generate", status="ok", prompt=f"p{i}", output=f"o{i}",
                         prompt_tokens=i, completion_tokens=2 * i, total_ms=0.01 * i))
    return log


def test_rows_are_chained_and_verify(tmp_path):
    log = fill(tmp_path / "a.db")
    rows = log.rows()
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    assert all(rows[i].prev_hash == rows[i - 1].row_hash for i in range(1, 5))
    assert log.verify() == (True, f"5 rows, chain intact, head {rows[-1].row_hash[:16]}")
    assert rows[0].prompt_sha256 != "p0" and len(rows[0].prompt_sha256) == 64


def test_wal_mode_and_reopen_continues_the_chain(tmp_path):
    fill(tmp_path / "a.db", 2).close()
    log = fill(tmp_path / "a.db", 2)
    assert [r.seq for r in log.rows()] == [1, 2, 3, 4] and log.verify()[0]
    mode = sqlite3.connect(tmp_path / "a.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def tamper(path, sql):
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()


def test_edited_row_is_named(tmp_path):
    fill(tmp_path / "a.db").close()
    tamper(tmp_path / "a.db", "UPDATE audit_log SET completion_tokens = 99 WHERE seq = 3")
    assert AuditLog(tmp_path / "a.db").verify() == (False, "row 3: contents do not match its hash: edited")


def test_deleted_row_is_named(tmp_path):
    fill(tmp_path / "a.db").close()
    tamper(tmp_path / "a.db", "DELETE FROM audit_log WHERE seq = 2")
    ok, msg = AuditLog(tmp_path / "a.db").verify()
    assert not ok and msg.startswith("row 2 is missing")
