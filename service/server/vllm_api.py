"""Routes that vLLM's OpenAI server has beside /v1, which benchmark clients and tools probe
(vLLM's benchmarks, TGI's and llama.cpp's clients, SageMaker-style hosting):

  GET  /health            200 while this worker can generate (as /readyz): probed before a run
  GET|POST /ping          the same (SageMaker's name, which vLLM answers too)
  GET  /version           {"version": the tailorgpt package's}
  POST /tokenize          {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens"}
  POST /detokenize        {"tokens"} -> {"prompt"}

A Starlette app mounted at "/", behind the same middleware as every route
(service/server/guards.py): /health, /ping and /version are open without an API key, the token
tools need one where keys are set; every route answers 503 while the server drains.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.engine import HOW_TO_ADD, LLMEngine, RequestError
from service.server.openai_api import ApiConfig, served_models
from service.server.protocol import (
    BadRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    Version,
    error,
    invalid,
    not_served,
    wire,
)


def package_version() -> str:
    try:
        return version("tailorgpt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _parsed(body: bytes, *models: type[BaseModel]) -> Any:
    """The body as the first model when it has `messages`, else as the last."""
    try:
        data = json.loads(body)
    except ValueError:
        return models[-1].model_validate_json(body)  # raises pydantic's JSON error
    chosen = models[0] if isinstance(data, dict) and "messages" in data else models[-1]
    return chosen.model_validate(data)


def create_root_app(engine: Callable[[], LLMEngine], config: ApiConfig) -> Starlette:
    name = config.model_name

    async def health(_: Request) -> Response:
        if not engine().alive():
            return error(503, "the engine's loop has stopped", "server_unavailable")
        return Response(status_code=200)

    async def version_(_: Request) -> Response:
        return JSONResponse(wire(Version(version=package_version())))

    async def tokenize(http: Request) -> Response:
        try:
            body = _parsed(await http.body(), TokenizeChatRequest, TokenizeCompletionRequest)
            if isinstance(body, TokenizeChatRequest):
                if config.chat_template is None:
                    raise BadRequest("messages", f"{name} has no chat template: {HOW_TO_ADD}")
                turns = [m.as_turn() for m in body.messages]
                text = config.chat_template.render(turns, bool(body.add_generation_prompt))
            else:
                text = body.prompt
        except ValidationError as e:
            return invalid(e)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error", e.param)
        if body.model not in (None, *(served := served_models(engine(), name))):
            return not_served(body.model, served)
        ids = engine().tokenize(text)
        answer = TokenizeResponse(count=len(ids), max_model_len=engine().context, tokens=ids)
        return JSONResponse(wire(answer))

    async def detokenize(http: Request) -> Response:
        try:
            body = DetokenizeRequest.model_validate_json(await http.body())
        except ValidationError as e:
            return invalid(e)
        if body.model not in (None, *(served := served_models(engine(), name))):
            return not_served(body.model, served)
        try:
            text = engine().detokenize(body.tokens)
        except RequestError as e:
            return error(400, str(e), "invalid_request_error", "tokens")
        return JSONResponse(wire(DetokenizeResponse(prompt=text)))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ping", health, methods=["GET", "POST"]),
            Route("/version", version_, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
        ]
    )
