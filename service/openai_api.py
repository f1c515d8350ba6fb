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
from contextlib import ExitStack
from typing import Annotated, Any

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
from service.params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_STOP,
    TokenLogprob,
)
from service.text import TextCodec

RETRY_AFTER_SECONDS = 1
MAX_PROMPTS = 64  # prompts in one request
MAX_N = 16  # samples per prompt


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's completion request; top_k, repetition_penalty and ignore_eos as in vLLM."""

    model_config = ConfigDict(extra="forbid", strict=True)  # `true` is not token id 1

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or token ids; a list of either for several completions at once."
    )
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = Field(False, description="Put the prompt before each completion's text.")
    user: str | None = None
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    def prompts(self) -> list[str] | list[list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        if not 0 < len(prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt: send 1 to {MAX_PROMPTS} prompts, not {len(prompt)}")
        return prompt  # type: ignore[return-value]

    def generation_requests(self) -> list[GenerationRequest]:
        options = {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias or {},
            "logprobs": self.logprobs,
            # Echoed with log-probabilities, the prompt is scored too.
            "prompt_logprobs": self.logprobs if self.echo else None,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop or [],
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
        }
        return [GenerationRequest(prompt=p, **options) for p in self.prompts()]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body: every refusal of this server has this shape."""

    error: ErrorDetail


def error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=None))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def invalid(e: ValidationError) -> JSONResponse:
    """400 whose `param` is the top-level field, as OpenAI's is. A value that matched no type
    of a union gets one error per type: the message gives the error of the type it had (a list
    too long), else what each type wanted."""
    errors = e.errors()
    loc = errors[0]["loc"]
    param = str(loc[0]) if loc else "body"
    field = [x for x in errors if x["loc"][:1] == loc[:1]]
    union = len(field) > 1  # its locations name union members: say the field alone
    where = param if union else ".".join(str(p) for p in loc) or param
    field = [x for x in field if not x["type"].endswith("_type")] or field
    wanted = "; or ".join(dict.fromkeys(x["msg"] for x in field))
    return error(400, f"{where}: {wanted}", "invalid_request_error", param)


def busy(e: QueueFull) -> JSONResponse:
    return error(
        503,
        f"server busy ({e}); retry after {RETRY_AFTER_SECONDS}s",
        "server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def create_app(engine: Callable[[], LLMEngine], model_name: str) -> Starlette:
    """The routes, given how to get this process's engine and the name clients ask for."""

    async def models(_: Request) -> Response:
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "tailorgpt"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def completions(http: Request) -> Response:
        try:
            body = CompletionRequest.model_validate_json(await http.body())
            requests = body.generation_requests()
        except ValidationError as e:
            return invalid(e)
        except ValueError as e:
            return error(400, str(e), "invalid_request_error", "prompt")
        if (total := len(requests) * body.n) > engine().scheduler.max_queue:
            return error(
                400,
                f"{len(requests)} prompts with n={body.n} are {total} completions, over the "
                f"{engine().scheduler.max_queue} this server queues: send fewer prompts or a "
                "smaller n",
                "invalid_request_error",
                "n" if body.n > 1 else "prompt",
            )
        if body.model not in (None, model_name):
            return error(
                404,
                f"model {body.model!r} is not served here; this server serves "
                f"{model_name!r} (GET /v1/models)",
                "invalid_request_error",
                "model",
            )
        streams = ExitStack()  # closing it cancels every request that has not finished
        try:
            # Choice i * n + j is prompt i's sample j, as OpenAI numbers them.
            opened = [
                streams.enter_context(stream)
                for r in requests
                for stream in engine().open(r, body.n)
            ]
        except RequestError as e:
            streams.close()
            param = "logit_bias" if str(e).startswith("logit_bias") else "prompt"
            return error(400, str(e), "invalid_request_error", param)
        except QueueFull as e:
            streams.close()
            return busy(e)
        echoes = [r.prompt if body.echo else "" for r in requests for _ in range(body.n)]
        chunk = _Chunks(model_name, engine().codec, echoes)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _sse(streams, opened, chunk, usage), media_type="text/event-stream"
            )
        with streams:
            answers = asyncio.ensure_future(asyncio.gather(*(s.result() for s in opened)))
            gone = asyncio.ensure_future(disconnected(http))
            await asyncio.wait((answers, gone), return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not answers.done():  # the client left: leaving `with` cancels its sequences
                answers.cancel()
                return Response(status_code=499)
        results = answers.result()
        if any(r.finish_reason == "error" for r in results):
            return error(500, "generation failed; see the server log", "server_error")
        return JSONResponse(chunk.whole(results))

    return Starlette(
        routes=[
            Route("/models", models, methods=["GET"]),
            Route("/completions", completions, methods=["POST"]),
        ]
    )


class _Chunks:
    """Completion objects of one request: the whole answer, or its streamed chunks."""

    def __init__(self, model_name: str, codec: TextCodec, echoes: list[str | list[int]]) -> None:
        self.model_name = model_name
        self.codec = codec
        # Choice i's prompt, put before its text (`echo`) in its first chunk; "" for none.
        self.echoes = [e if isinstance(e, str) else codec.decode(e) for e in echoes]
        self.echoed: set[int] = set()
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def choice(self, index: int, text: str, event: Event | Generation) -> dict[str, Any]:
        finish = event.finish_reason
        entries = list(event.logprobs or [])
        if index not in self.echoed:  # the first chunk of this choice
            self.echoed.add(index)
            text = self.echoes[index] + text
            entries = (event.prompt_logprobs or []) + entries
        return {
            "text": text,
            "index": index,
            "logprobs": self.logprobs(entries) if entries else None,
            "finish_reason": "stop" if finish == "cancelled" else finish,
        }

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's legacy completion format: token strings, their log-probabilities, the
        likeliest alternatives of each, and where each token starts in the text. An echoed
        prompt's first token has none (null), as OpenAI's has."""
        tokens = [self.codec.decode([e.token_id]) for e in entries]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                None if e.logprob is None else {self.codec.decode([i]): lp for i, lp in e.top}
                for e in entries
            ],
            "text_offset": offsets,
        }

    def usage(self, lasts: list[Event] | list[Generation]) -> dict[str, int]:
        prompt = sum(e.prompt_tokens for e in lasts)
        completion = sum(e.completion_tokens for e in lasts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def whole(self, results: list[Generation]) -> dict[str, Any]:
        choices = [self.choice(i, r.text, r) for i, r in enumerate(results)]
        return self.body(choices) | {"usage": self.usage(results)}


async def disconnected(http: Request) -> None:
    """Returns when the client has gone (its request body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _merged(opened: list[AsyncStream]) -> AsyncIterator[tuple[int, Event]]:
    """Every stream's events as they come, each with its stream's index."""
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncStream) -> None:
        async for event in stream:
            events.put_nowait((index, event))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(opened)]
    finished = 0
    try:
        while finished < len(opened):
            index, event = await events.get()
            finished += event.finish_reason is not None
            yield index, event
    finally:
        for task in pumps:
            task.cancel()


async def _sse(
    streams: ExitStack, opened: list[AsyncStream], chunk: _Chunks, usage: bool
) -> AsyncIterator[str]:
    """`data: {chunk}` per event, `data: [DONE]` at the end; a disconnect cancels the sequences."""
    lasts: list[Event] = []
    with streams:
        async for index, event in _merged(opened):
            if event.finish_reason is not None:
                lasts.append(event)
            body = chunk.body([chunk.choice(index, event.text, event)])
            yield f"data: {json.dumps(body)}\n\n"
        if usage:
            yield f"data: {json.dumps(chunk.body([]) | {'usage': chunk.usage(lasts)})}\n\n"
        yield "data: [DONE]\n\n"
