"""Structured outputs on the real server: OpenAI's response_format (the SDK's
`chat.completions.parse`, LangChain's `with_structured_output`) and vLLM's structured_outputs
(choice, regex, json, grammar) on /v1 and /generate. The tiny model knows no JSON: every answer
parses only because each row's grammar masks its tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import openai
import pytest
import requests
from helpers import MODEL_NAME, generate, greedy
from pydantic import BaseModel, Field

MODEL = f"tailorgpt-{MODEL_NAME}"


class Verdict(BaseModel):
    """Bounded in every field, so that the JSON ends well within max_tokens."""

    mood: Literal["happy", "sad", "calm"]
    score: int = Field(ge=0, le=9)
    ok: bool
    word: str = Field(max_length=6)


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, timeout=60)


def test_the_sdks_parse_with_a_pydantic_model(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    for seed in range(3):
        answer = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "How do you feel?"}],
            response_format=Verdict,
            max_completion_tokens=120,
            seed=seed,
        )
        assert isinstance(answer.choices[0].message.parsed, Verdict), answer
        assert answer.choices[0].finish_reason == "stop"


def test_langchain_with_structured_output(server: str, export_dir: Path) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=MODEL, base_url=f"{server}/v1", api_key="unused", max_retries=0, max_tokens=120
    )
    structured = chat.with_structured_output(Verdict)
    for question in ["How are you?", "Rate the weather.", "One word?"]:
        assert isinstance(structured.invoke(question), Verdict)


def test_structured_outputs_choice_regex_json_and_grammar(server: str) -> None:
    base = {"prompt": "The", "max_tokens": 40, "temperature": 1.0, "seed": 3}
    for spec, check in [
        ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        ({"json": Verdict.model_json_schema()}, Verdict.model_validate_json),
        ({"grammar": 'start: "red" | "green" " " "tea"'}, lambda t: t in ("red", "green tea")),
        ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
    ]:
        answer = post(server, "/v1/completions", {**base, "structured_outputs": spec})
        assert answer.status_code == 200, (spec, answer.text)
        choice = answer.json()["choices"][0]
        if choice["finish_reason"] == "stop":  # json_object is unbounded: it may be cut
            assert check(choice["text"]), (spec, choice)
    cut = post(
        server,
        "/v1/completions",
        {
            **base,
            "max_tokens": 2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "v", "schema": Verdict.model_json_schema()},
            },
        },
    )
    assert cut.json()["choices"][0]["finish_reason"] == "length"


def test_a_bad_grammar_is_a_400_that_says_what_is_wrong(server: str) -> None:
    for body, param, words in [
        ({"structured_outputs": {"json": {"type": "objectx"}}}, "structured_outputs", "objectx"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs", "one"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
    ]:
        answer = post(server, "/v1/completions", {"prompt": "The", **body})
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and words in error["message"], error
    refused = generate(server, greedy("The", 5, structured_outputs={"regex": "(unclosed"}))
    assert refused.status_code == 400 and "regex" in refused.text


def test_a_rows_grammar_leaves_its_batch_mates_alone(server: str) -> None:
    spec = {"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}
    alone = generate(server, greedy("The", 10, **spec)).json()
    mates = generate(server, greedy("Once", 10), greedy("The", 10, **spec), greedy("The", 10))
    plain = generate(server, greedy("The", 10)).json()
    assert mates.json()[1] == alone[0] and alone[0]["text"] in ("alpha", "beta", "gamma")
    assert mates.json()[2]["text"] == plain[0]["text"]  # the unconstrained row is unchanged


@pytest.mark.parametrize("route", ["/v1/chat/completions"])
def test_json_object_on_chat(server: str, route: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "JSON please"}],
        "response_format": {"type": "json_object"},
        "max_tokens": 60,
        "temperature": 0,
    }
    choice = post(server, route, body).json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["finish_reason"] == "length"


def test_a_schema_is_compiled_once_and_each_sample_has_its_own_state(fp32_engine) -> None:
    from service.engine import GenerationRequest, StructuredOutputs

    spec = StructuredOutputs(json={"type": "object", "properties": {"once": {"type": "boolean"}}})
    cache = fp32_engine.grammars._compiled
    misses = cache.cache_info().misses
    request = GenerationRequest(prompt="The", max_new_tokens=30, structured_outputs=spec)
    results = fp32_engine.generate([request, request.model_copy(update={"seed": 1})])
    assert cache.cache_info().misses == misses + 1  # the second request found it compiled
    assert all(isinstance(json.loads(r.text), dict) for r in results if r.finish_reason == "stop")
