"""`--max-request-bytes`: JSON bodies over it get 413 in OpenAI's error shape, from `Content-Length` before the body
is read and while reading a chunked one; bodies at the limit, and adapter uploads (their own limit), are served."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from switchboard.serving.api.body import SMALL_BODY_BYTES

from .adapter_files import base_shape, lora_files, upload
from .conftest import RunningServer, ServerFactory
from .test_errors import assert_error_shape

LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def limited(server_factory: ServerFactory) -> RunningServer:
    return server_factory(max_request_bytes=LIMIT)


@pytest.fixture()
def http(limited: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        yield c


def assert_too_large(resp: httpx.Response) -> None:
    assert resp.status_code == 413, resp.text
    assert_error_shape(resp.json(), type_="invalid_request_error", code="request_too_large")
    assert str(LIMIT) in resp.json()["error"]["message"] and "--max-request-bytes" in resp.json()["error"]["message"]


def padded(body: dict, size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (trailing spaces, which JSON ignores)."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def raw_exchange(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send a request's head and the start of its body on a raw socket, never the rest: what the server answers
    then, it answered without waiting for the body to end."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer: {answer!r}"
            answer += chunk
        return answer


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"])
def test_content_length_over_the_limit_is_413(http: httpx.Client, route: str) -> None:
    body = {"prompt": "x" * LIMIT, "messages": [{"role": "user", "content": "x"}], "lora_name": "a", "lora_path": "b"}
    assert_too_large(http.post(route, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}))


def test_content_length_is_refused_before_the_body_is_read(limited: RunningServer) -> None:
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    answer = raw_exchange(limited.url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_chunked_body_over_the_limit_is_413(http: httpx.Client) -> None:
    """No Content-Length: the limit is enforced while reading."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(4 * LIMIT // 1024):
            yield b"x" * 1024
        yield b'"}'

    assert_too_large(http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}))


def test_chunked_body_is_refused_at_the_limit_without_reading_further(limited: RunningServer) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    data = b'{"messages": [{"role": "user", "content": "' + b"x" * LIMIT
    answer = raw_exchange(limited.url, head, f"{len(data):x}\r\n".encode() + data + b"\r\n")  # no final chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer


def test_openai_client_sees_413(limited: RunningServer, model_name: str) -> None:
    client = openai.OpenAI(base_url=limited.api_url, api_key="x", max_retries=0, timeout=60)
    with client, pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model_name, prompt="x" * (2 * LIMIT), max_tokens=1)
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"


def test_a_body_at_the_limit_is_served(http: httpx.Client) -> None:
    body = padded({"prompt": "hello", "max_tokens": 2, "ignore_eos": True}, LIMIT)
    resp = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2
    body = padded({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}, LIMIT)
    resp = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert_too_large(http.post("/v1/completions", content=body + b" ", headers={"Content-Type": "application/json"}))


def test_bad_bodies_within_the_limit_keep_their_400(http: httpx.Client) -> None:
    cases = [
        b'{"prompt": "x", "junk": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested past the parser's depth
        b'{"prompt": ',  # not JSON
        b"\x80\x81{}",  # not UTF-8
        b"[1, 2]",  # not an object
        json.dumps({"prompt": [1] * 1000 + ["a"] * 1000}).encode(),  # neither kind of prompt
    ]
    for body in cases:
        resp = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (body[:40], resp.text)
        assert_error_shape(resp.json(), type_="invalid_request_error")
        assert len(resp.content) < 4096  # one error per wrong item would be a long answer
    resp = http.post("/v1/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"})
    assert resp.status_code == 400
    assert_error_shape(resp.json(), type_="invalid_request_error")


def test_uploads_have_their_own_limit(http: httpx.Client, tiny_model_dir: Path) -> None:
    """A multipart upload is limited by --max-adapter-bytes only: one larger than --max-request-bytes is stored."""
    files = lora_files(base_shape(tiny_model_dir), rank=16)
    assert sum(len(data) for data in files.values()) > LIMIT
    resp = upload(http, "bigger-than-a-request", files)
    assert resp.status_code == 201, resp.text


def test_big_bodies_are_parsed_alike(server: RunningServer) -> None:
    """Bodies over SMALL_BODY_BYTES are parsed in the parse process: the same answers as small ones."""
    filler = {"junk": [0] * (2 * SMALL_BODY_BYTES)}  # ignored by the model, makes the body big
    ok = {"prompt": "hello", "max_tokens": 2, "ignore_eos": True}
    wrong = {"prompt": [1, "a"], "max_tokens": 2}
    too_long = {"prompt": "hello " * 2 * server.engine.max_model_len, "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for body in (ok, wrong, too_long):
            small = http.post("/v1/completions", json=body)
            big = http.post("/v1/completions", json={**body, **filler})
            assert big.status_code == small.status_code, (body, big.text)
            if small.status_code != 200:
                assert big.json() == small.json()
        assert big.json()["error"]["code"] == "context_length_exceeded"
        for raw in (b'{"prompt": ' + b" " * (2 * SMALL_BODY_BYTES), b"[" * (2 * SMALL_BODY_BYTES)):
            resp = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400, resp.text
            assert_error_shape(resp.json(), type_="invalid_request_error")
