"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models` over the
engine (Starlette routes).

A plain ASGI app rather than BentoML APIs because the OpenAI wire format needs what those
do not give: Server-Sent Events, OpenAI-shaped error bodies, 503 with Retry-After, and a
disconnect that cancels the sequence.

What real clients send is accepted: `null` for any optional field means its default, and a
field OpenAI does not define is ignored (and logged once). A field OpenAI defines whose effect
this server cannot give (`suffix`, `tools`) is a 400 naming it, rather than an answer that
silently is not what was asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.engine import (
    HOW_TO_ADD,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_STOP,
    AsyncStream,
    ChatTemplate,
    Event,
    Generation,
    GenerationRequest,
    LLMEngine,
    QueueFull,
    RequestError,
    TextCodec,
    TokenLogprob,
)
from service.server.requestlog import log_event, outcome, record

RETRY_AFTER_SECONDS = 1
MAX_PROMPTS = 64  # prompts in one request
MAX_N = 16  # samples per prompt
MAX_MESSAGES = 1024
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
KEEPALIVE_SECONDS = 5.0  # an SSE comment this often while a stream waits: proxies keep it
# Chat fields OpenAI defines that change nothing here: accepted without a word.
CHAT_FIELDS_IGNORED = frozenset(
    {
        "metadata",
        "modalities",
        "parallel_tool_calls",
        "prediction",
        "prompt_cache_key",
        "reasoning_effort",
        "safety_identifier",
        "service_tier",
        "store",
        "tool_choice",
        "function_call",
        "verbosity",
        "web_search_options",
    }
)
_logged_fields: set[str] = set()


class BadRequest(ValueError):
    """A request this server will not run; `param` is the field to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class OpenAIRequest(BaseModel):
    """What completions and chat share. `null` for a field means its default, as in OpenAI's
    API; top_k, repetition_penalty and ignore_eos are vLLM's."""

    # strict: `true` is not token id 1; extra fields are ignored (see ignored_fields).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = Field(None, description="Accepted; not used.")
    top_k: int | None = Field(0, ge=0)
    repetition_penalty: float | None = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool | None = False

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    def ignored_fields(self, quiet: frozenset[str] = frozenset()) -> None:
        """Log each field name this server does not know, once per process."""
        for name in (self.model_extra or {}).keys() - quiet - _logged_fields:
            _logged_fields.add(name)
            log_event("ignored_field", field=name, route=type(self).__name__)

    def generation_request(
        self,
        prompt: str | list[int],
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=prompt,
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias or {},
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(OpenAIRequest):
    """OpenAI's completion request."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or token ids; a list of either for several completions at once."
    )
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = Field(False, description="Put the prompt before each completion's text.")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of = n is supported.")
    suffix: str | None = Field(None, description="Not supported: a non-empty one is refused.")

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError(
                "this server does not insert text between a prompt and a suffix: send the "
                "text before the insertion point as the prompt, without suffix"
            )
        return suffix

    def prompts(self) -> list[str] | list[list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        if not 0 < len(prompt) <= MAX_PROMPTS:
            raise BadRequest(
                "prompt", f"prompt: send 1 to {MAX_PROMPTS} prompts, not {len(prompt)}"
            )
        return prompt  # type: ignore[return-value]

    def generation_requests(self) -> list[GenerationRequest]:
        if self.best_of not in (None, self.n):
            raise BadRequest(
                "best_of",
                f"best_of: only best_of = n is supported (n is {self.n}): leave best_of out",
            )
        self.ignored_fields()
        # Echoed with log-probabilities, the prompt is scored too.
        scored = self.logprobs if self.echo else None
        return [
            self.generation_request(p, self.max_tokens, self.logprobs, scored)
            for p in self.prompts()
        ]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def as_turn(self) -> dict[str, str]:
        """The message as the template takes it: text content, OpenAI's `developer` as the
        `system` models were trained with."""
        content = self.content
        if isinstance(content, list):
            if kinds := {p.type for p in content} - {"text"}:
                raise BadRequest("messages", f"messages: only text content, not {sorted(kinds)}")
            content = "".join(p.text or "" for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Default: as many as the context fits."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="OpenAI's older max_completion_tokens."
    )
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: none or [].")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported: none or [].")
    response_format: dict[str, Any] | None = Field(
        None, description='Only {"type": "text"} is supported.'
    )

    @field_validator("tools", "functions")
    @classmethod
    def no_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("this model does not call tools: leave tools and functions out")
        return tools

    @field_validator("response_format")
    @classmethod
    def text_only(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        if response_format and response_format.get("type") != "text":
            raise ValueError('only {"type": "text"} is supported: leave response_format out')
        return response_format

    def generation_requests(self, template: ChatTemplate) -> list[GenerationRequest]:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs", "top_logprobs: set logprobs to true as well")
        self.ignored_fields(CHAT_FIELDS_IGNORED)
        prompt = template.render([m.as_turn() for m in self.messages])
        max_tokens = self.max_completion_tokens or self.max_tokens or MAX_NEW_TOKENS_LIMIT
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        request = self.generation_request(prompt, max_tokens, logprobs)
        # The next turn's start ends the reply; past the client's own stop strings.
        return [request.model_copy(update={"stop": request.stop + template.stops})]


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
    code: str | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
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


@dataclass
class ApiConfig:
    """What the routes need besides the engine."""

    model_name: str
    chat_template: ChatTemplate | None = None
    log_prompts: bool = False


def create_app(engine: Callable[[], LLMEngine], config: ApiConfig) -> Starlette:
    """The routes, given how to get this process's engine and what it serves."""
    name = config.model_name
    entry = {"id": name, "object": "model", "created": 0, "owned_by": "tailorgpt"}

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [entry]})

    async def model(http: Request) -> Response:
        if http.path_params["model"] != name:
            return not_served(http.path_params["model"], name)
        return JSONResponse(entry)

    async def completions(http: Request) -> Response:
        try:
            body = CompletionRequest.model_validate_json(await http.body())
            requests = body.generation_requests()
        except ValidationError as e:
            return invalid(e)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error", e.param)
        echoes = [r.prompt if body.echo else "" for r in requests for _ in range(body.n)]
        return await _answer(http, engine(), config, body, requests, _Completions(echoes))

    async def chat(http: Request) -> Response:
        if config.chat_template is None:
            return error(400, f"{name} has no chat template: {HOW_TO_ADD}", "invalid_request_error")
        try:
            body = ChatCompletionRequest.model_validate_json(await http.body())
            requests = body.generation_requests(config.chat_template)
        except ValidationError as e:
            return invalid(e)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error", e.param)
        return await _answer(
            http, engine(), config, body, requests, _ChatCompletions(bool(body.logprobs))
        )

    return Starlette(
        routes=[
            Route("/models", models, methods=["GET"]),
            Route("/models/{model:path}", model, methods=["GET"]),
            Route("/completions", completions, methods=["POST"]),
            Route("/chat/completions", chat, methods=["POST"]),
            # Anything else under /v1 (a wrong method too), which BentoML would answer in
            # plain text.
            Route("/{rest:path}", no_route, methods=ANY_METHOD),
        ]
    )


async def no_route(http: Request) -> Response:
    return error(
        404,
        f"no route {http.method} {http.url.path} here: this server has GET /v1/models, "
        "GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions",
        "invalid_request_error",
    )


def not_served(asked: str, name: str) -> JSONResponse:
    return error(
        404,
        f"model {asked!r} is not served here; this server serves {name!r} (GET /v1/models)",
        "invalid_request_error",
        "model",
        code="model_not_found",
    )


async def _answer(
    http: Request,
    engine: LLMEngine,
    config: ApiConfig,
    body: OpenAIRequest,
    requests: list[GenerationRequest],
    fmt: _Format,
) -> Response:
    """Run the requests' n samples each and answer as `fmt` says, whole or streamed."""
    n = body.n or 1
    if (total := len(requests) * n) > engine.max_queue:
        return error(
            400,
            f"{len(requests)} prompts with n={n} are {total} completions, over the "
            f"{engine.max_queue} this server queues: send fewer prompts or a smaller n",
            "invalid_request_error",
            "n" if n > 1 else "prompt",
        )
    if body.model not in (None, config.model_name):
        return not_served(body.model, config.model_name)
    log = record(http.scope)
    if config.log_prompts:
        log.fields["prompt"] = [r.prompt for r in requests]
    streams = ExitStack()  # closing it cancels every request that has not finished
    try:
        # Choice i * n + j is prompt i's sample j, as OpenAI numbers them.
        opened = [streams.enter_context(s) for r in requests for s in engine.open(r, n)]
    except RequestError as e:
        streams.close()
        param = "logit_bias" if str(e).startswith("logit_bias") else fmt.prompt_param
        return error(400, str(e), "invalid_request_error", param)
    except QueueFull as e:
        streams.close()
        return busy(e)
    fmt.start(log.id, config.model_name, engine.codec, len(opened))
    if body.stream:
        return StreamingResponse(
            _sse(streams, opened, fmt, body.include_usage, log.fields),
            media_type="text/event-stream",
        )
    with streams:
        answers = asyncio.ensure_future(asyncio.gather(*(s.result() for s in opened)))
        gone = asyncio.ensure_future(disconnected(http))
        await asyncio.wait((answers, gone), return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        log.fields.update(outcome([s.stats for s in opened]))
        if not answers.done():  # the client left: leaving `with` cancels its sequences
            answers.cancel()
            return Response(status_code=499)
    results = answers.result()
    if any(r.finish_reason == "error" for r in results):
        return error(500, "generation failed; see the server log", "server_error")
    return JSONResponse(fmt.whole(results))


class _Format:
    """One request's answer in its route's format: whole, or as streamed chunks."""

    object = chunk_object = ""
    prompt_param = "prompt"  # the field a prompt the engine refuses came from

    def start(self, request_id: str, model_name: str, codec: TextCodec, choices: int) -> None:
        self.id = request_id
        self.model_name = model_name
        self.codec = codec
        self.created = int(time.time())
        self.started: set[int] = set()  # choices that have had their first chunk

    def body(self, choices: list[dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind or self.object,
            "created": self.created,
            "model": self.model_name,
            "choices": choices,
        }

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before any text."""
        return []

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, results: list[Generation]) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, lasts: list[Event]) -> dict[str, Any]:
        return self.body([], self.chunk_object) | {"usage": self.usage(lasts)}

    def usage(self, lasts: list[Event] | list[Generation]) -> dict[str, int]:
        prompt = sum(e.prompt_tokens for e in lasts)
        completion = sum(e.completion_tokens for e in lasts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _finish(event: Event | Generation) -> str | None:
    # A stream cut short by its client has nobody to tell; "stop" is what OpenAI has.
    return "stop" if event.finish_reason == "cancelled" else event.finish_reason


class _Completions(_Format):
    object = chunk_object = "text_completion"

    def __init__(self, echoes: list[str | list[int]]) -> None:
        self.raw_echoes = echoes  # choice i's prompt before its text (`echo`); "" for none

    def start(self, request_id: str, model_name: str, codec: TextCodec, choices: int) -> None:
        super().start(request_id, model_name, codec, choices)
        self.echoes = [e if isinstance(e, str) else codec.decode(e) for e in self.raw_echoes]

    def choice(self, index: int, text: str, event: Event | Generation) -> dict[str, Any]:
        entries = list(event.logprobs or [])
        if index not in self.started:  # the choice's first chunk
            self.started.add(index)
            text = self.echoes[index] + text
            entries = (event.prompt_logprobs or []) + entries
        return {
            "text": text,
            "index": index,
            "logprobs": self.logprobs(entries) if entries else None,
            "finish_reason": _finish(event),
        }

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        return self.body([self.choice(index, event.text, event)])

    def whole(self, results: list[Generation]) -> dict[str, Any]:
        choices = [self.choice(i, r.text, r) for i, r in enumerate(results)]
        return self.body(choices) | {"usage": self.usage(results)}

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


class _ChatCompletions(_Format):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    prompt_param = "messages"

    def __init__(self, logprobs: bool) -> None:
        self.with_logprobs = logprobs

    def start(self, request_id: str, model_name: str, codec: TextCodec, choices: int) -> None:
        super().start(request_id, model_name, codec, choices)
        self.choices = choices

    def content(self, index: int, text: str) -> str:
        """The reply without the space the template's `assistant:` leaves to the model."""
        if index not in self.started:
            text = text.lstrip()
            if text:
                self.started.add(index)
        return text

    def opening(self) -> list[dict[str, Any]]:
        """The role, one chunk per choice as OpenAI sends it, before any text."""
        delta = {"role": "assistant", "content": ""}
        return [
            self.body([self._choice(i, "delta", delta, None, None)], self.chunk_object)
            for i in range(self.choices)
        ]

    def chunk(self, index: int, event: Event) -> dict[str, Any]:
        text = self.content(index, event.text)
        delta = {"content": text} if text or not event.finish_reason else {}
        choice = self._choice(index, "delta", delta, self.logprobs(event), _finish(event))
        return self.body([choice], self.chunk_object)

    def whole(self, results: list[Generation]) -> dict[str, Any]:
        choices = [
            self._choice(
                i,
                "message",
                {"role": "assistant", "content": self.content(i, r.text), "refusal": None},
                self.logprobs(r),
                _finish(r),
            )
            for i, r in enumerate(results)
        ]
        return self.body(choices) | {"usage": self.usage(results)}

    @staticmethod
    def _choice(
        index: int, key: str, message: dict[str, Any], logprobs: Any, finish: str | None
    ) -> dict[str, Any]:
        return {"index": index, key: message, "logprobs": logprobs, "finish_reason": finish}

    def logprobs(self, event: Event | Generation) -> dict[str, Any] | None:
        """OpenAI's chat format: each token with its log-probability, bytes and likeliest
        alternatives."""
        if not self.with_logprobs:
            return None
        return {
            "content": [
                self.token(e.token_id, e.logprob)
                | {"top_logprobs": [self.token(*t) for t in e.top]}
                for e in event.logprobs or []
            ],
            "refusal": None,
        }

    def token(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        text = self.codec.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


async def disconnected(http: Request) -> None:
    """Returns when the client has gone (its request body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _merged(opened: list[AsyncStream]) -> AsyncIterator[tuple[int, Event] | None]:
    """Every stream's events as they come, each with its stream's index; None each time
    nothing came for KEEPALIVE_SECONDS."""
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncStream) -> None:
        async for event in stream:
            events.put_nowait((index, event))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(opened)]
    finished = 0
    try:
        while finished < len(opened):
            try:
                index, event = await asyncio.wait_for(events.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield None
                continue
            finished += event.finish_reason is not None
            yield index, event
    finally:
        for task in pumps:
            task.cancel()


async def _sse(
    streams: ExitStack,
    opened: list[AsyncStream],
    fmt: _Format,
    usage: bool,
    log: dict[str, Any],
) -> AsyncIterator[str]:
    """`data: {chunk}` per event, `: queued` comments while nothing comes, `data: [DONE]` at
    the end; a disconnect cancels the sequences."""
    lasts: list[Event] = []
    with streams:
        try:
            for opening in fmt.opening():
                yield f"data: {json.dumps(opening)}\n\n"
            async for item in _merged(opened):
                if item is None:
                    yield ": queued\n\n"
                    continue
                index, event = item
                if event.finish_reason is not None:
                    lasts.append(event)
                yield f"data: {json.dumps(fmt.chunk(index, event))}\n\n"
            if usage:
                yield f"data: {json.dumps(fmt.usage_chunk(lasts))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            log.update(outcome([s.stats for s in opened]))
