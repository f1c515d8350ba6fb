"""A body over the limit gets its 413 in every common client, over real HTTP: the server
answers, then reads and discards what the client still sends (a bounded amount), so the
client is never reset mid-send before it can read the answer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import httpx
import pytest
import requests

BIG = b'{"prompt": "' + b"x" * (20 * 2**20) + b'"}'  # 20 MB, the limit is 1 MB
LIMIT = 2**20


def check(status: int, body: bytes) -> None:
    assert status == 413
    message = json.loads(body)["error"]["message"]
    assert f"limit of {LIMIT} bytes" in message


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_requests_reads_the_413(server: str, path: str) -> None:
    answer = requests.post(
        f"{server}{path}", data=BIG, headers={"Content-Type": "application/json"}, timeout=60
    )
    check(answer.status_code, answer.content)


def test_httpx_reads_the_413(server: str) -> None:
    answer = httpx.post(
        f"{server}/v1/completions",
        content=BIG,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    check(answer.status_code, answer.content)


def test_urllib_reads_the_413(server: str) -> None:
    request = urllib.request.Request(
        f"{server}/v1/chat/completions",
        data=BIG,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    check(refused.value.code, refused.value.read())


def test_the_server_still_answers_on_a_new_connection(server: str) -> None:
    requests.post(f"{server}/v1/completions", data=BIG, timeout=60)
    answer = requests.post(f"{server}/v1/completions", json={"prompt": "The"}, timeout=60)
    assert answer.status_code == 200
