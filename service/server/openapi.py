"""The OpenAPI document the server publishes at /docs.json: BentoML's own, completed.

BentoML builds it from its `@bentoml.api` methods and describes mounted apps only when they
are FastAPI apps, so the Starlette routes of /v1 were missing. It also labels the document
OpenAPI 3.0.2 while filling it with pydantic's JSON Schema 2020-12 (a numeric
`exclusiveMinimum`, `anyOf` with `null`), which is OpenAPI 3.1's dialect: tools that trust the
label, Schemathesis among them, refuse the schema of /generate. So the document is relabelled
3.1.0 and the /v1 routes, the error bodies and the refusals every route can give are added,
their schemas those of the models the routes answer with (service/server/protocol.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.server.guards import generation_route
from service.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorBody,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    Version,
)

REF = "#/components/schemas/{model}"


def _schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """Components for these models, with the models they use lifted out of `$defs`."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _json(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=model)}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json("ErrorBody")}


BUSY = _error("Busy or shutting down: retry after the Retry-After header's seconds") | {
    "headers": {"Retry-After": {"schema": {"type": "integer"}}}
}
TOO_LARGE = _error("The request body is over the server's limit")
NOT_JSON = _error("The body is multipart: every route takes JSON")
UNAUTHORIZED = _error("An API key is set and the request has not got it")

HEALTH = {
    "200": {"description": "This worker can generate (as /readyz); the body is empty"},
    "503": _error("The engine has stopped, or the server is shutting down"),
}
ROOT_PATHS: dict[str, Any] = {
    "/health": {
        "get": {
            "operationId": "health",
            "description": "As vLLM's: 200 while the server can generate; open without a key.",
            "responses": HEALTH,
        }
    },
    "/ping": {
        method: {
            "operationId": f"ping_{method}",
            "description": "As /health (SageMaker's name, which vLLM answers too).",
            "responses": HEALTH,
        }
        for method in ("get", "post")
    },
    "/version": {
        "get": {
            "operationId": "version",
            "description": "As vLLM's: the server's (tailorgpt's) version.",
            "responses": {"200": {"description": "The version", "content": _json("Version")}},
        }
    },
}

TOKENIZE_BODY = {
    "application/json": {
        "schema": {
            "oneOf": [
                {"$ref": REF.format(model="TokenizeCompletionRequest")},
                {"$ref": REF.format(model="TokenizeChatRequest")},
            ]
        }
    }
}
ROOT_PATHS |= {
    "/tokenize": {
        "post": {
            "operationId": "tokenize",
            "description": "As vLLM's: the token ids of a prompt, or of messages laid out by "
            "the chat template (a body with `messages`).",
            "requestBody": {"required": True, "content": TOKENIZE_BODY},
            "responses": {
                "200": {"description": "The token ids", "content": _json("TokenizeResponse")},
                "400": _error("The request is invalid, or the model has no chat template"),
                "404": _error("The model asked for is not served here"),
            },
        }
    },
    "/detokenize": {
        "post": {
            "operationId": "detokenize",
            "description": "As vLLM's: the text of token ids.",
            "requestBody": {"required": True, "content": _json("DetokenizeRequest")},
            "responses": {
                "200": {"description": "The text", "content": _json("DetokenizeResponse")},
                "400": _error("The request is invalid: a token id outside the vocabulary"),
                "404": _error("The model asked for is not served here"),
            },
        }
    },
}

V1_PATHS: dict[str, Any] = {
    "/v1/models": {
        "get": {
            "operationId": "openai_models",
            "description": "OpenAI-compatible: the one model this server serves.",
            "responses": {"200": {"description": "The model", "content": _json("ModelList")}},
        }
    },
    "/v1/models/{model}": {
        "get": {
            "operationId": "openai_model",
            "description": "OpenAI-compatible: the model of this id.",
            "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "The model", "content": _json("Model")},
                "404": _error("No model of this id is served here"),
            },
        }
    },
    "/v1/completions": {
        "post": {
            "operationId": "openai_completions",
            "description": "OpenAI-compatible completions; `stream: true` answers with "
            "Server-Sent Events, `data: {Completion chunk}` each and `data: [DONE]` last.",
            "requestBody": {"required": True, "content": _json("CompletionRequest")},
            "responses": {
                "200": {
                    "description": "The completion, or its stream",
                    "content": _json("Completion")
                    | {"text/event-stream": {"schema": {"description": "Completion chunks"}}},
                },
                "400": _error("The request is invalid; the message says what to change"),
                "404": _error("The model asked for is not served here"),
                "500": _error("Generation failed; the server log says why"),
            },
        }
    },
    "/v1/chat/completions": {
        "post": {
            "operationId": "openai_chat_completions",
            "description": "OpenAI-compatible chat completions, the messages laid out by the "
            "model's chat template; `stream: true` answers with Server-Sent Events, "
            "`data: {ChatCompletion chunk}` each and `data: [DONE]` last.",
            "requestBody": {"required": True, "content": _json("ChatCompletionRequest")},
            "responses": {
                "200": {
                    "description": "The chat completion, or its stream",
                    "content": _json("ChatCompletion")
                    | {"text/event-stream": {"schema": {"description": "Chat completion chunks"}}},
                },
                "400": _error("The request is invalid, or the model has no chat template"),
                "404": _error("The model asked for is not served here"),
                "500": _error("Generation failed; the server log says why"),
            },
        }
    },
}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """BentoML's document with the /v1 routes added, as OpenAPI 3.1."""
    paths = {**document["paths"], **ROOT_PATHS, **V1_PATHS}
    schemas = _schemas(
        CompletionRequest,
        Completion,
        ChatCompletionRequest,
        ChatCompletion,
        ModelList,
        ErrorBody,
        Version,
        TokenizeCompletionRequest,
        TokenizeChatRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
    )
    # BentoML's 400 has pydantic's list of errors as its detail, not the string it documents.
    invalid = document["components"]["schemas"]["InvalidArgument"]
    schemas["InvalidArgument"] = {
        **invalid,
        "properties": {**invalid["properties"], "detail": {"title": "Error Detail"}},
    }
    return {
        **document,
        "openapi": "3.1.0",
        "paths": {
            path: {method: _refusals(path, method, op) for method, op in item.items()}
            for path, item in paths.items()
        },
        "components": {
            **document["components"],
            "schemas": document["components"]["schemas"] | schemas,
        },
    }


def _refusals(path: str, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    """The operation with what any route may answer (service/server/guards.py): 503 while busy or
    draining, 413 for a body over the limit, 415 for a multipart one, 401 without an API key
    where one is set."""
    refusals = {"503": BUSY} | ({"413": TOO_LARGE, "415": NOT_JSON} if method == "post" else {})
    if generation_route(path):
        refusals["401"] = UNAUTHORIZED
    return {**operation, "responses": operation["responses"] | refusals}


def docs_app(bentoml_document: Callable[[], dict[str, Any]]) -> Starlette:
    """Serves /docs.json; mounted ahead of BentoML's route of the same path, which it replaces.
    `bentoml_document` gives BentoML's document as a dict."""

    async def docs(_: Request) -> JSONResponse:
        return JSONResponse(complete(bentoml_document()))

    return Starlette(routes=[Route("/docs.json", docs, methods=["GET"])])
