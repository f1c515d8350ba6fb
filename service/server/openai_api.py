"""OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models` over the
engine (Starlette routes).

A plain ASGI app rather than BentoML APIs because the OpenAI wire format needs what those
do not give: Server-Sent Events, OpenAI-shaped error bodies, 503 with Retry-After, and a
disconnect that cancels the sequence. Requests, answers and errors are the models of
service/server/protocol.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST
from service.engine import (
    HOW_TO_ADD,
    AdapterError,
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
from service.server.protocol import (
    BadRequest,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatTopLogprob,
    Choice,
    Completion,
    CompletionLogprobs,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    Model,
    ModelList,
    OpenAIRequest,
    UnloadLoRAAdapterRequest,
    Usage,
    busy,
    error,
    invalid,
    no_route,
    not_served,
    wire,
    wrong_method,
)
from service.server.requestlog import log_event, outcome, record

ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Fields the engine checks (against the vocabulary, its policy): its message starts with one.
ENGINE_CHECKED = {"logit_bias", "stop_token_ids", "priority", "structured_outputs"}
KEEPALIVE_SECONDS = 5.0  # an SSE comment this often while a stream waits: proxies keep it


@dataclass
class ApiConfig:
    """What the routes need besides the engine."""

    model_name: str
    chat_template: ChatTemplate | None = None
    log_prompts: bool = False
    lora_dir: Path | None = None  # where /v1/load_lora_adapter may read; None: off


def create_app(engine: Callable[[], LLMEngine], config: ApiConfig) -> Starlette:
    """The routes, given how to get this process's engine and what it serves."""
    name = config.model_name

    def entry(model: str) -> Model:
        # vLLM's card: benchmark clients read max_model_len (the context, prompt plus output);
        # an adapter's parent is the base model, as vLLM lists its LoRA modules.
        return Model(
            id=model,
            object="model",
            created=0,
            owned_by="tailorgpt",
            root=name,
            parent=None if model == name else name,
            max_model_len=engine().context,
        )

    async def models(_: Request) -> Response:
        served = [entry(model) for model in served_models(engine(), name)]
        return JSONResponse(wire(ModelList(object="list", data=served)))

    async def model(http: Request) -> Response:
        asked = http.path_params["model"]
        if asked not in (served := served_models(engine(), name)):
            return not_served(asked, served)
        return JSONResponse(wire(entry(asked)))

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

    async def load_lora_adapter(http: Request) -> Response:
        try:
            body = LoadLoRAAdapterRequest.model_validate_json(await http.body())
            path = adapter_path(config.lora_dir, body.lora_path)
            await asyncio.to_thread(engine().load_lora_adapter, body.lora_name, path)
        except ValidationError as e:
            return invalid(e)
        except BadRequest as e:
            return error(400, str(e), "invalid_request_error", e.param)
        except AdapterError as e:
            return error(400, str(e), "invalid_request_error", "lora_path")
        log_event("lora_adapter_loaded", name=body.lora_name, path=str(path))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(http: Request) -> Response:
        try:
            body = UnloadLoRAAdapterRequest.model_validate_json(await http.body())
        except ValidationError as e:
            return invalid(e)
        if config.lora_dir is None:
            return runtime_loading_off()
        if body.lora_name not in engine().lora_adapters():
            return not_served(body.lora_name, served_models(engine(), name))
        # It may wait for a load that waits for the running step: not on the event loop.
        await asyncio.to_thread(engine().unload_lora_adapter, body.lora_name)
        log_event("lora_adapter_unloaded", name=body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    routes = [
        Route("/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
        Route("/models", models, methods=["GET"]),
        Route("/models/{model:path}", model, methods=["GET"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
    ]

    async def unmatched(http: Request) -> Response:
        """A route of another method: 405 with Allow; else 404 (both OpenAI-shaped, where
        BentoML would answer in plain text)."""
        for route in routes:
            if route.matches(http.scope)[0] is Match.PARTIAL:
                return wrong_method(http, sorted(route.methods or ()))
        return await no_route(http)

    return Starlette(routes=[*routes, Route("/{rest:path}", unmatched, methods=ANY_METHOD)])


def adapter_path(lora_dir: Path | None, given: str) -> Path:
    """The adapter directory a load names, inside `lora_dir` once links are followed, its
    files too (a path out of it, or a link that leads out, is refused)."""
    if lora_dir is None:
        raise BadRequest("lora_path", RUNTIME_LOADING_OFF)
    root = lora_dir.resolve()
    try:
        path = (root / given).resolve()
        files = [(path / name).resolve() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST)]
    except (OSError, RuntimeError, ValueError) as err:  # a loop of links, a NUL byte...
        raise BadRequest("lora_path", f"lora_path: {given!r:.200} is not a path ({err})") from None
    if not all(p.is_relative_to(root) for p in [path, *files]):
        raise BadRequest(
            "lora_path",
            f"lora_path: {given!r:.200} leads outside this server's adapters directory: put the "
            "adapter in it and give its path relative to it",
        )
    return path


RUNTIME_LOADING_OFF = (
    "loading adapters at run time is off on this server: start it with TAILORGPT_LORA_DIR "
    "(serve --lora_dir) set to the directory adapters are loaded from"
)


def runtime_loading_off() -> JSONResponse:
    return error(400, RUNTIME_LOADING_OFF, "invalid_request_error")


def served_models(engine: LLMEngine, name: str) -> list[str]:
    """The base model's name and its adapters'."""
    return [name, *engine.lora_adapters()]


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
    served = served_models(engine, config.model_name)
    if body.model is not None and body.model not in served:
        return not_served(body.model, served)
    log = record(http.scope)
    if config.log_prompts:
        log.fields["prompt"] = [r.prompt for r in requests]
    streams = ExitStack()  # closing it cancels every request that has not finished
    try:
        # Choice i * n + j is prompt i's sample j, as OpenAI numbers them.
        opened = [streams.enter_context(s) for r in requests for s in engine.open(r, n)]
    except RequestError as e:
        streams.close()
        field = str(e).split(":", 1)[0]
        param = field if field in ENGINE_CHECKED else fmt.prompt_param
        if field == "structured_outputs" and body.structured_outputs is None:
            param = "response_format"  # where the schema came from
        return error(400, str(e), "invalid_request_error", param)
    except QueueFull as e:
        streams.close()
        return busy(e)
    fmt.start(log.id, body.model or config.model_name, engine.codec, len(opened))
    if body.stream:
        return StreamingResponse(
            _sse(streams, opened, fmt, body.include_usage, log.fields, body.continuous_usage),
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
    return JSONResponse(wire(fmt.whole(results)))


Answer = Completion | ChatCompletion


class _Format:
    """One request's answer in its route's format: whole, or as streamed chunks."""

    answer: type[Completion] | type[ChatCompletion]
    object = chunk_object = ""
    prompt_param = "prompt"  # the field a prompt the engine refuses came from

    def start(self, request_id: str, model_name: str, codec: TextCodec, choices: int) -> None:
        self.id = request_id
        self.model_name = model_name
        self.codec = codec
        self.created = int(time.time())
        self.started: set[int] = set()  # choices that have had their first chunk

    def body(
        self, choices: list[Any], kind: str | None = None, usage: Usage | None = None
    ) -> Answer:
        answer = self.answer(
            id=self.id,
            object=kind or self.object,
            created=self.created,
            model=self.model_name,
            choices=choices,
        )
        if usage:  # set only where there is one: a chunk's answer leaves the field out
            answer.usage = usage
        return answer

    def opening(self) -> list[Answer]:
        """Chunks sent before any text."""
        return []

    def chunk(self, index: int, event: Event) -> Answer:
        raise NotImplementedError

    def whole(self, results: list[Generation]) -> Answer:
        raise NotImplementedError

    def usage_chunk(self, lasts: list[Event]) -> Answer:
        return self.body([], self.chunk_object, usage=self.usage(lasts))

    def usage(self, lasts: list[Event] | list[Generation]) -> Usage:
        prompt = sum(e.prompt_tokens for e in lasts)
        completion = sum(e.completion_tokens for e in lasts)
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


def _finish(event: Event | Generation) -> str | None:
    # A stream cut short by its client has nobody to tell; "stop" is what OpenAI has.
    return "stop" if event.finish_reason == "cancelled" else event.finish_reason


class _Completions(_Format):
    answer = Completion
    object = chunk_object = "text_completion"

    def __init__(self, echoes: list[str | list[int]]) -> None:
        self.raw_echoes = echoes  # choice i's prompt before its text (`echo`); "" for none

    def start(self, request_id: str, model_name: str, codec: TextCodec, choices: int) -> None:
        super().start(request_id, model_name, codec, choices)
        self.echoes = [e if isinstance(e, str) else codec.decode(e) for e in self.raw_echoes]

    def choice(self, index: int, text: str, event: Event | Generation) -> Choice:
        entries = list(event.logprobs or [])
        if index not in self.started:  # the choice's first chunk
            self.started.add(index)
            text = self.echoes[index] + text
            entries = (event.prompt_logprobs or []) + entries
        return Choice(
            text=text,
            index=index,
            logprobs=self.logprobs(entries) if entries else None,
            finish_reason=_finish(event),
        )

    def chunk(self, index: int, event: Event) -> Answer:
        return self.body([self.choice(index, event.text, event)])

    def whole(self, results: list[Generation]) -> Answer:
        choices = [self.choice(i, r.text, r) for i, r in enumerate(results)]
        return self.body(choices, usage=self.usage(results))

    def logprobs(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        tokens = [self.codec.decode([e.token_id]) for e in entries]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[
                None if e.logprob is None else {self.codec.decode([i]): lp for i, lp in e.top}
                for e in entries
            ],
            text_offset=[sum(len(t) for t in tokens[:i]) for i in range(len(tokens))],
        )


class _ChatCompletions(_Format):
    answer = ChatCompletion
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

    def opening(self) -> list[Answer]:
        """The role, one chunk per choice as OpenAI sends it, before any text."""
        return [
            self.body(
                [
                    ChatChoice(
                        index=i,
                        delta=ChatMessageOut(role="assistant", content=""),
                        logprobs=None,
                        finish_reason=None,
                    )
                ],
                self.chunk_object,
            )
            for i in range(self.choices)
        ]

    def chunk(self, index: int, event: Event) -> Answer:
        text = self.content(index, event.text)
        delta = (
            ChatMessageOut(content=text) if text or not event.finish_reason else ChatMessageOut()
        )
        choice = ChatChoice(
            index=index, delta=delta, logprobs=self.logprobs(event), finish_reason=_finish(event)
        )
        return self.body([choice], self.chunk_object)

    def whole(self, results: list[Generation]) -> Answer:
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(
                    role="assistant", content=self.content(i, r.text), refusal=None
                ),
                logprobs=self.logprobs(r),
                finish_reason=_finish(r),
            )
            for i, r in enumerate(results)
        ]
        return self.body(choices, usage=self.usage(results))

    def logprobs(self, event: Event | Generation) -> ChatLogprobs | None:
        if not self.with_logprobs:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **self.token(e.token_id, e.logprob),
                    top_logprobs=[ChatTopLogprob(**self.token(*t)) for t in e.top],
                )
                for e in event.logprobs or []
            ],
            refusal=None,
        )

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
    continuous_usage: bool = False,
) -> AsyncIterator[str]:
    """`data: {chunk}` per event, `: queued` comments while nothing comes, `data: [DONE]` at
    the end; a disconnect cancels the sequences. With `continuous_usage` (vLLM's
    continuous_usage_stats) every chunk carries the usage so far."""
    lasts: list[Event] = []
    # Each choice's latest numbers: its prompt from the start, its tokens as they are sent.
    latest = [Event("", None, s.stats.prompt_tokens, 0) for s in opened]

    def so_far(answer: Answer) -> Answer:
        if continuous_usage:
            answer.usage = fmt.usage(latest)
        return answer

    with streams:
        try:
            for opening in fmt.opening():
                yield f"data: {json.dumps(wire(so_far(opening)))}\n\n"
            async for item in _merged(opened):
                if item is None:
                    yield ": queued\n\n"
                    continue
                index, event = item
                if event.finish_reason is not None:
                    lasts.append(event)
                latest[index] = event
                yield f"data: {json.dumps(wire(so_far(fmt.chunk(index, event))))}\n\n"
            if usage:
                yield f"data: {json.dumps(wire(fmt.usage_chunk(lasts)))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            log.update(outcome([s.stats for s in opened]))
