"""Hostile HTTP clients against a live gateway and daemon, over raw sockets.

Malformed HTTP gets exactly one 4xx answer — never silence, never two responses, never a traceback: integers
past 64 bits, JSON nested past the parser's depth, a Transfer-Encoding beside a Content-Length (request smuggling
behind a proxy that reuses connections), a GET carrying a body, an HTTP/2 preface. Slow and
idle clients cost nobody else a slot: idle connections and heads that trickle in are cut at the header deadline,
a body that never arrives gets 408, one address holds at most ``max_per_source`` requests in flight. A client
that half-closes is treated as gone: its request is cancelled, and its audit row says so."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import time

import pytest

from appliance.audit.chain import sha256_text
from appliance.transport import protocol as P
from tests.conftest import http_site

MODEL = "tiny"
HEADER_S, BODY_S = 2, 4  # the site's deadlines, short so that the tests waiting for them are quick


@pytest.fixture(scope="module")
def site(tiny_build, tmp_path_factory):
    limits = f"header_timeout_s = {HEADER_S}\nbody_timeout_s = {BODY_S}\nmax_connections = 3\nmax_per_source = 2"
    limits += "\nkeep_alive_requests = 3\nmax_open_per_source = 6\nmax_open_connections = 64"
    with http_site(tiny_build, tmp_path_factory.mktemp("hostile-http"), http_extra=limits) as started:
        yield started


def connect(site, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", site.port), timeout=10, source_address=(source, 0))


def get_status(site, path: str = "/health", source: str = "127.0.0.1") -> int:
    with connect(site, source) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def until_status(site, want: int, source: str = "127.0.0.1", timeout: float = 5.0) -> int:
    """GET /health until it answers ``want`` (the gateway admits requests as it reads them: no fixed wait)."""
    deadline = time.monotonic() + timeout
    while (status := get_status(site, source=source)) != want and time.monotonic() < deadline:
        pass
    return status


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - start


def exchange(site, raw: bytes) -> list[tuple[int, bytes]]:
    """Send ``raw`` on one connection, read until the server closes or goes quiet; every response's status."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
        sock.sendall(raw)
        sock.settimeout(3)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
    return [(int(m.group(1)), m.group(0)) for m in re.finditer(rb"HTTP/1\.[01] (\d{3})[^\r\n]*", data)]


def post(site, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {site.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize(
    "field,value",
    [("max_tokens", str(1 << 64)), ("seed", str(1 << 70)), ("seed", str(-(1 << 64))), ("max_tokens", "1" + "0" * 5000)],
    ids=["max_tokens-2^64", "seed-2^70", "seed-minus-2^64", "max_tokens-5001-digits"],
)
def test_huge_integers_get_one_400(site, field, value):
    body = b'{"model": "tiny", "prompt": "hi", "%s": %s}' % (field.encode(), value.encode())
    responses = exchange(site, post(site, body))
    assert [code for code, _ in responses] == [400], responses


def test_json_nested_past_the_parser_depth_gets_one_400(site):
    body = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    responses = exchange(site, post(site, body))
    assert [code for code, _ in responses] == [400], responses


def test_transfer_encoding_beside_content_length_is_refused_once(site):
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = post(site, b"0\r\n\r\n" + smuggled, extra="Transfer-Encoding: chunked\r\n")
    responses = exchange(site, raw)
    assert [code for code, _ in responses] == [400], responses  # the hidden GET is never answered


def test_a_get_with_a_body_is_refused_once(site):
    raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 33\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    responses = exchange(site, raw)
    assert [code for code, _ in responses] == [400], responses


def test_idle_connections_and_trickling_heads_do_not_starve_anyone(site):
    """The hand-written gateway gave 64 idle connections every slot (others got 503); now an idle connection
    holds no slot and is closed at the header deadline, and one address holds at most max_open_per_source (6)
    connections (the rest are closed unread)."""
    idle = [connect(site) for _ in range(80)]
    trickle = [connect(site) for _ in range(10)]
    try:
        for sock in trickle:
            with contextlib.suppress(OSError):  # most were closed unread: over the per-source cap
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert get_status(site, source="127.0.0.2") == 200
    finally:
        for sock in idle + trickle:
            sock.close()


def test_a_head_that_trickles_is_cut_at_the_header_deadline(site):
    """One header byte every 0.2 s used to keep a slot forever (the deadline was per read)."""
    with connect(site) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < HEADER_S + 8:
            try:
                sock.sendall(b"X")
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.2)[0]:
                closed = sock.recv(65536) == b""
        elapsed = time.monotonic() - start
    assert closed and HEADER_S - 0.5 <= elapsed < HEADER_S + 5, elapsed


def test_a_body_that_never_arrives_gets_one_408(site):
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {site.key}\r\nContent-Length: 100\r\n\r\n"
    )
    with connect(site) as sock:
        sock.sendall(head.encode() + b'{"model": ')
        data, elapsed = read_until_closed(sock, BODY_S + 10)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", data) == [b"408"], data
    assert BODY_S - 0.5 <= elapsed < BODY_S + 5


def test_requests_in_flight_are_capped_per_source_and_in_all(site):
    """max_per_source = 2, max_connections = 3: requests whose body is still arriving hold their slots."""
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {site.key}\r\nContent-Length: 100\r\n\r\n"
    )
    held = []
    try:
        for source in ("127.0.0.1", "127.0.0.1"):
            held.append(connect(site, source))
            held[-1].sendall(head.encode())
        assert until_status(site, 429) == 429  # this address has two in flight
        assert get_status(site, source="127.0.0.2") == 200  # another address is not affected
        held.append(connect(site, "127.0.0.2"))
        held[-1].sendall(head.encode())
        assert until_status(site, 503, source="127.0.0.3") == 503  # three in flight: the gateway's cap
    finally:
        for sock in held:
            sock.close()
    assert until_status(site, 200) == 200  # the slots come back when those clients leave


def test_http2_prior_knowledge_gets_one_505_and_a_close(site):
    """HTTP/2 is not served (nor upgraded to): its preface reads as a request for version 2.0, refused once."""
    with connect(site) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data, elapsed = read_until_closed(sock, HEADER_S + 10)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", data) == [b"505"] and elapsed < HEADER_S, data


def test_a_half_closed_client_is_cancelled_and_audited_as_cancelled(site):
    """Half-closing after the request reads as leaving: no answer is written, and the row says cancelled (the
    hand-written gateway wrote no answer while the row said ok)."""
    prompt = "half-closed client " + str(time.time_ns())
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 256, "ignore_eos": True}).encode()
    with connect(site) as sock:
        sock.sendall(post(site, body))
        sock.shutdown(socket.SHUT_WR)
        data, _ = read_until_closed(sock, 30)
    row = site.wait_for_row(prompt_sha256=sha256_text(prompt))
    if data:  # answered after all: then the answer is complete and the row says ok
        assert re.findall(rb"HTTP/1\.1 (\d{3})", data) == [b"200"] and row.status == "ok"
    else:
        assert (row.status, row.error_code) == ("error", P.E_CANCELLED)


def test_a_connection_is_closed_after_keep_alive_requests_answers(site):
    """keep_alive_requests = 3: three requests are answered on one connection, then the server closes it."""
    with connect(site) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
        data, elapsed = read_until_closed(sock, HEADER_S + 10)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", data) == [b"200"] * 3 and elapsed < HEADER_S, data
    assert data.lower().count(b"connection: close") == 1  # the third answer says the connection ends


def test_connections_per_source_are_capped_idle_ones_included(site):
    """max_open_per_source = 6: the seventh connection from one address is closed unread; another address is not."""
    held = [connect(site) for _ in range(6)]
    try:
        extra = connect(site)
        data, _ = read_until_closed(extra, HEADER_S + 5)
        assert data == b""  # closed before anything was read or answered
        extra.close()
        assert get_status(site, source="127.0.0.2") == 200
    finally:
        for sock in held:
            sock.close()
    assert until_status(site, 200) == 200
