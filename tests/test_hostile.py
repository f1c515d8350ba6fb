"""Hostile input against the real server: none of it may reach a 5xx, and every refusal names
the field and what to do."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
import requests

from service.engine import MAX_NEW_TOKENS_LIMIT

ROUTES = {"/v1/completions": "prompt", "/generate": "requests"}
LIMIT = 2**20  # TAILORGPT_MAX_BODY_BYTES's default
CONTEXT = 256  # the test model's


def post(server: str, path: str, body: bytes | dict) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    return requests.post(f"{server}{path}", data=data, headers=headers, timeout=60)


def completion(server: str, **body: object) -> requests.Response:
    return post(server, "/v1/completions", {"prompt": "The", **body})


def raw(server: str, head: bytes, body: bytes) -> http.client.HTTPResponse:
    """Send a request as bytes (maybe less body than it declares) and read the answer."""
    host, port = server.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=20)
    connection.sendall(head + body)
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response


def assert_refused(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert all(word in error["message"] for word in words), error
    return error


@pytest.mark.parametrize("path", ROUTES)
def test_a_20_mb_body_is_refused_by_its_length_before_it_is_read(server: str, path: str) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {20 * 2**20}\r\n\r\n"
    response = raw(server, head.encode(), b'{"prompt": "')  # the rest is never sent
    assert response.status == 413
    message = json.load(response)["error"]["message"]
    assert f"limit of {LIMIT} bytes" in message and "TAILORGPT_MAX_BODY_BYTES" in message


def test_a_chunked_body_is_refused_once_past_the_limit(server: str) -> None:
    chunk = b"x" * 2**16
    chunks = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    response = raw(server, head, chunks * (LIMIT // len(chunk) + 1) + b"0\r\n\r\n")
    assert response.status == 413, response.read()


def test_deeply_nested_json(server: str) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_refused(post(server, "/v1/completions", deep), 400, "recursion limit")
    nested = b'{"requests": ' + deep + b"}"
    assert post(server, "/generate", nested).status_code == 400


@pytest.mark.parametrize(
    "prompt",
    [b'"\xff\xfe caf\xc3"', b'"\\ud800 lone"', b'"\\udc00"', b'"\\ud800\\u0041"'],
    ids=["invalid-utf8", "lone-high-surrogate", "lone-low-surrogate", "unpaired-surrogate"],
)
def test_invalid_utf8_and_lone_surrogates(server: str, prompt: bytes) -> None:
    assert_refused(post(server, "/v1/completions", b'{"prompt": ' + prompt + b"}"), 400)
    body = b'{"requests": [{"prompt": ' + prompt + b"}]}"
    assert post(server, "/generate", body).status_code == 400


def test_prompts_of_control_characters_are_served(server: str) -> None:
    controls = "".join(map(chr, [*range(32), 127])) * 2
    answer = completion(server, prompt=controls, max_tokens=4)
    assert answer.status_code == 200, answer.text
    assert post(server, "/generate", {"requests": [{"prompt": controls}]}).status_code == 200


def test_thousands_of_stop_strings_and_a_huge_logit_bias(server: str) -> None:
    error = assert_refused(completion(server, stop=["x"] * 5000), 400, "at most 8", "not 5000")
    assert error["param"] == "stop"
    bias = {str(i): 1.0 for i in range(50_000)}
    error = assert_refused(completion(server, logit_bias=bias), 400, "at most 1024")
    assert error["param"] == "logit_bias"
    too_many = {"requests": [{"prompt": "The", "stop": ["x"] * 5000}]}
    assert "at most 8" in post(server, "/generate", too_many).text


@pytest.mark.parametrize("max_tokens", [0, -1, MAX_NEW_TOKENS_LIMIT + 1, 10**30])
def test_max_tokens_out_of_range(server: str, max_tokens: int) -> None:
    error = assert_refused(completion(server, max_tokens=max_tokens), 400, "max_tokens: ")
    assert error["param"] == "max_tokens"


@pytest.mark.parametrize("max_tokens", [1, CONTEXT - 2, CONTEXT, CONTEXT + 1, 4096])
def test_max_tokens_in_range_stops_at_the_context(server: str, max_tokens: int) -> None:
    answer = completion(server, max_tokens=max_tokens, ignore_eos=True, temperature=0)
    assert answer.status_code == 200, answer.text
    usage, choice = answer.json()["usage"], answer.json()["choices"][0]
    # The prompt is one token: output ends at the context whatever max_tokens asks.
    assert usage["completion_tokens"] == min(max_tokens, CONTEXT - usage["prompt_tokens"])
    assert choice["finish_reason"] == "length"


def test_more_completions_than_the_queue_holds_is_a_400_not_a_503(server: str) -> None:
    error = assert_refused(completion(server, prompt=["The"] * 64, n=16), 400, "1024 completions")
    assert error["param"] == "n"


def test_a_multipart_body_is_refused(server: str) -> None:
    for path in ROUTES:
        headers = {"Content-Type": "multipart/form-data"}
        response = requests.post(f"{server}{path}", data=b"{}", headers=headers, timeout=30)
        assert_refused(response, 415, "application/json")


def test_a_path_with_a_newline_gets_openais_404(server: str) -> None:
    answer = requests.get(f"{server}/v1/models/a%0Ab", timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "invalid_request_error"
