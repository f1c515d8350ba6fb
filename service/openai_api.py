"""OpenAI-compatible `/v1/completions` and `/v1/models` over the engine (Starlette routes).

A plain ASGI app rather than BentoML APIs because the OpenAI wire format needs what those
do not give: Server-Sent Events, OpenAI-shaped error bodies, 503 with Retry-After, and a
disconnect that cancels the sequence.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.engine import (
    AsyncStream,
    Event,
    Generation,
    GenerationRequest,
    LLMEngine,
    QueueFull,
    RequestError,
)

RETRY_AFTER_SECONDS = 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completion request; top_k, repetition_penalty and ignore_eos as in vLLM."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] = Field(description="One prompt (a list of one is accepted).")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    def generation_request(self) -> GenerationRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise ValueError("prompt: send one prompt per request (a list of one is accepted)")
        return GenerationRequest(
            prompt=prompts[0],
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


def error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Callable[[], LLMEngine], model_name: str) -> Starlette:
    """The routes, given how to get this process's engine and the name clients ask for."""

    async def models(_: Request) -> Response:
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "tailorgpt"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def completions(http: Request) -> Response:
        try:
            body = CompletionRequest.model_validate_json(await http.body())
            request = body.generation_request()
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            return error(400, f"{param}: {first['msg']}", "invalid_request_error", param)
        except ValueError as e:
            return error(400, str(e), "invalid_request_error", "prompt")
        if body.model not in (None, model_name):
            return error(
                404,
                f"model {body.model!r} is not served here; this server serves "
                f"{model_name!r} (GET /v1/models)",
                "invalid_request_error",
                "model",
            )
        try:
            stream = engine().open(request)
        except RequestError as e:
            return error(400, str(e), "invalid_request_error", "prompt")
        except QueueFull as e:
            return error(
                503,
                f"server busy ({e}); retry after {RETRY_AFTER_SECONDS}s",
                "server_overloaded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        chunk = _Chunks(model_name)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(stream, chunk, usage), media_type="text/event-stream")
        with stream:
            answer = asyncio.ensure_future(stream.result())
            gone = asyncio.ensure_future(disconnected(http))
            await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not answer.done():  # the client left: leaving `with` cancels its sequence
                answer.cancel()
                return Response(status_code=499)
        result = answer.result()
        if result.finish_reason == "error":
            return error(500, "generation failed; see the server log", "server_error")
        return JSONResponse(chunk.build(result.text, result, usage=True))

    return Starlette(
        routes=[
            Route("/models", models, methods=["GET"]),
            Route("/completions", completions, methods=["POST"]),
        ]
    )


class _Chunks:
    """Completion objects of one request: the whole answer, or its streamed chunks."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def build(self, text: str, event: Event | Generation | None, usage: bool) -> dict[str, Any]:
        finish = event.finish_reason if event else None
        choices = (
            []
            if event is None
            else [
                {
                    "text": text,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop" if finish == "cancelled" else finish,
                }
            ]
        )
        body: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }
        if usage and event is not None:
            body["usage"] = {
                "prompt_tokens": event.prompt_tokens,
                "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens,
            }
        return body


async def disconnected(http: Request) -> None:
    """Returns when the client has gone (its request body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _sse(stream: AsyncStream, chunk: _Chunks, usage: bool) -> AsyncIterator[str]:
    """`data: {chunk}` per event, `data: [DONE]` at the end; a disconnect cancels the sequence."""
    with stream:
        async for event in stream:
            yield f"data: {json.dumps(chunk.build(event.text, event, usage=False))}\n\n"
        if usage:
            final = chunk.build("", None, usage=False) | {
                "usage": chunk.build("", event, True)["usage"]
            }
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"
