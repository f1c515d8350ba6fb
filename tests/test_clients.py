"""The OpenAI clients people use, against the real server: the official SDK (completions and
chat, plain and streaming), LangChain's `OpenAI` and `ChatOpenAI`, and LiteLLM's `openai/`
(chat) and `text-completion-openai/` (completions) providers, each with no API key set and
with one (then 401 without it)."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest
from helpers import KEYS, MODEL_NAME

# LiteLLM fetches its model price list from the internet at import unless told not to. It and
# LangChain are imported by the tests that use them: they take seconds to import, which a
# collection that leaves these tests out (`make test-fast`) should not pay.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = f"tailorgpt-{MODEL_NAME}"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(params=["no key set", "key set"])
def target(request: pytest.FixtureRequest, export_dir: Path) -> tuple[str, str | None]:
    """(server URL, the key it needs or None); `export_dir` names what both servers need, so
    that conftest marks these tests `model` (getfixturevalue hides the server)."""
    if request.param == "no key set":
        return request.getfixturevalue("server"), None
    return request.getfixturevalue("keyed_server"), KEYS[1]


def sdk(url: str, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "unused", max_retries=0)


def test_the_openai_sdk(target: tuple[str, str | None]) -> None:
    client = sdk(*target)
    options = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    text = client.completions.create(prompt="The", **options).choices[0].text
    streamed = client.completions.create(prompt="The", stream=True, **options)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    reply = client.chat.completions.create(messages=MESSAGES, **options)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **options
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_langchain(target: tuple[str, str | None]) -> None:
    from langchain_openai import ChatOpenAI, OpenAI

    url, key = target
    options = {"model": MODEL, "base_url": f"{url}/v1", "api_key": key or "unused"}
    llm = OpenAI(**options, max_tokens=8, temperature=0, max_retries=0)
    text = llm.invoke("The")
    assert isinstance(text, str) and text == "".join(llm.stream("The"))
    chat = ChatOpenAI(**options, max_completion_tokens=8, temperature=0, max_retries=0)
    reply = chat.invoke([(m["role"], m["content"]) for m in MESSAGES])
    assert isinstance(reply.content, str)
    streamed = "".join(str(c.content) for c in chat.stream([("user", "Hello")]))
    assert streamed == chat.invoke([("user", "Hello")]).content


@pytest.mark.parametrize("provider", ["openai", "text-completion-openai"])
def test_litellm(target: tuple[str, str | None], provider: str) -> None:
    import litellm

    url, key = target
    options = {
        "model": f"{provider}/{MODEL}",
        "api_base": f"{url}/v1",
        "api_key": key or "unused",
        "max_tokens": 8,
        "temperature": 0,
        "num_retries": 0,
    }
    reply = litellm.completion(messages=[{"role": "user", "content": "Hello"}], **options)
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens >= 1
    chunks = litellm.completion(
        messages=[{"role": "user", "content": "Hello"}], stream=True, **options
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == reply.choices[0].message.content
    )


def test_a_wrong_or_missing_key_is_refused_by_every_client(keyed_server: str) -> None:
    import litellm
    from langchain_openai import ChatOpenAI, OpenAI

    for key in (None, "sk-wrong"):
        with pytest.raises(openai.AuthenticationError) as refused:
            sdk(keyed_server, key).chat.completions.create(model=MODEL, messages=MESSAGES)
        assert refused.value.status_code == 401
        assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            OpenAI(model=MODEL, base_url=f"{keyed_server}/v1", api_key=key or "x").invoke("a")
        with pytest.raises(openai.AuthenticationError):
            ChatOpenAI(model=MODEL, base_url=f"{keyed_server}/v1", api_key=key or "x").invoke("a")
        for provider in ("openai", "text-completion-openai"):
            with pytest.raises(litellm.AuthenticationError):
                litellm.completion(
                    model=f"{provider}/{MODEL}",
                    api_base=f"{keyed_server}/v1",
                    api_key=key or "x",
                    messages=MESSAGES,
                    num_retries=0,
                )
