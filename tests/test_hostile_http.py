"""Malformed HTTP gets exactly one 4xx answer — never silence, never two responses, never a traceback: integers
past 64 bits, JSON nested past the parser's depth, a Transfer-Encoding beside a Content-Length (request smuggling
behind a proxy that reuses connections), a GET carrying a body. Raw sockets against a live gateway and daemon."""

from __future__ import annotations

import re
import socket

import pytest

from tests.conftest import http_site

MODEL = "tiny"


@pytest.fixture(scope="module")
def site(tiny_build, tmp_path_factory):
    with http_site(tiny_build, tmp_path_factory.mktemp("hostile-http")) as started:
        yield started


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
