"""The published OpenAPI document, and Schemathesis fuzzing every route from it against the
real server: no 5xx, every answer as documented (so every /v1 error OpenAI-shaped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import requests
from helpers import generate, greedy

from service.server.openai_api import ChatCompletionRequest, CompletionRequest

CHECKS = [
    "not_a_server_error",
    "response_schema_conformance",  # error bodies included: /v1's are ErrorBody
    "status_code_conformance",  # every status the server gives is documented
    "content_type_conformance",
    "response_headers_conformance",
]


def test_the_document_describes_every_route(server: str) -> None:
    document = requests.get(f"{server}/docs.json", timeout=30).json()
    assert document["openapi"] == "3.1.0"
    routes = {"/generate", "/v1/models", "/v1/models/{model}", "/v1/completions", "/readyz"}
    assert routes | {"/v1/chat/completions"} <= set(document["paths"])
    # vLLM's routes that benchmark clients and tools probe, and its request fields.
    assert {"/health", "/ping", "/version", "/tokenize", "/detokenize"} <= set(document["paths"])
    schemas = document["components"]["schemas"]
    assert schemas["Model"]["properties"]["max_model_len"]
    fields = {"stop_token_ids", "min_tokens", "include_stop_str_in_output", "priority"}
    fields |= {"response_format", "structured_outputs", "stream_options"}
    for request in ("CompletionRequest", "ChatCompletionRequest"):
        assert fields <= set(schemas[request]["properties"]), request
    assert "continuous_usage_stats" in schemas["StreamOptions"]["properties"]
    error = schemas["ErrorBody"]
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    for path, model in [
        ("/v1/completions", CompletionRequest),
        ("/v1/chat/completions", ChatCompletionRequest),
    ]:
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        del expected["$defs"]
        assert schemas[body.rsplit("/", 1)[1]] == expected
        for status in ("400", "401", "404", "413", "503"):
            content = operation["responses"][status]["content"]["application/json"]
            assert schemas[content["schema"]["$ref"].rsplit("/", 1)[1]] == error
        assert "Retry-After" in operation["responses"]["503"]["headers"]


METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def test_schemathesis_finds_nothing_and_the_server_still_answers(
    server: str, tmp_path: Path
) -> None:
    document = requests.get(f"{server}/docs.json", timeout=30).json()
    operations = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server}/docs.json",
            "--checks",
            ",".join(CHECKS),
            "--max-examples",
            "40",
            "--request-timeout",
            "30",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # Every operation of the document was fuzzed, and passed: none failed, erred or skipped.
    cases = ElementTree.parse(report).getroot().iter("testcase")
    outcomes = {case.get("name"): [child.tag for child in case] for case in cases}
    assert operations and operations <= set(outcomes), (operations, result.stdout[-3000:])
    assert not any(outcomes.values()), outcomes
    assert generate(server, greedy("The")).status_code == 200
    answer = requests.post(f"{server}/v1/completions", json={"prompt": "The"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] is not None
