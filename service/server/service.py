"""The BentoML service: a thin HTTP shell around the generation engine.

  POST /generate         batchable (BentoML adaptive batching), whole completions
  POST /v1/completions   OpenAI-compatible, `stream: true` for Server-Sent Events
  POST /v1/chat/completions  OpenAI-compatible, with the model's chat template
  GET  /v1/models, /v1/models/{id}  OpenAI-compatible (with vLLM's max_model_len), the
                         model and its LoRA adapters (with their parent)
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter  vLLM's: adapters at run time, from
                         TAILORGPT_LORA_DIR only
  GET  /health, /ping, /version, POST /tokenize, /detokenize  as vLLM's (vllm_api.py)
  GET  /metrics          Prometheus: BentoML's and the engine's (service/engine/metrics.py)
  GET  /docs.json        OpenAPI 3.1 of all of these (service/server/openapi.py)

Every route refuses a request body over TAILORGPT_MAX_BODY_BYTES with 413 before reading it,
and on SIGTERM the server drains: new requests and /readyz get 503 with Retry-After, running
requests finish within TAILORGPT_DRAIN_SECONDS, then it exits 0 (service/server/guards.py).

Both generation routes feed the same engine, which batches continuously. Settings come from
TAILORGPT_* environment variables, so the same Bento runs anywhere; service/server/settings.py lists
them (`tailorgpt serve --help` shows each as a flag), TAILORGPT_API_KEY besides. A bad value
stops the server at start with one line naming it.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from contextlib import ExitStack
from pathlib import Path

import bentoml
from pydantic import PrivateAttr, field_validator, model_validator

from artifacts import UserError
from service.engine import (
    REJECTED,
    AsyncStream,
    ChatTemplateError,
    LLMEngine,
    QueueFull,
    read_chat_template,
)
from service.server.guards import Drain, Guards
from service.server.openai_api import ApiConfig, create_app
from service.server.openapi import docs_app
from service.server.playground import playground_app
from service.server.protocol import Generation, GenerationRequest
from service.server.requestlog import CURRENT, RequestRecord, outcome
from service.server.settings import (
    SettingError,
    lora_enabled,
    lora_modules,
    named_api_keys,
    settings_from,
)
from service.server.vllm_api import create_root_app

try:
    SETTINGS = settings_from()
    API_KEYS = named_api_keys(SETTINGS)
except SettingError as e:  # one line, not a traceback from BentoML's import of this module
    sys.exit(f"tailorgpt: error: {e}")

QUEUE_POLL_SECONDS = 0.05
MODEL = bentoml.models.BentoModel(SETTINGS.model)
MODEL_NAME = SETTINGS.model.split(":")[0]
DRAIN = Drain(SETTINGS.drain_seconds)  # this worker process's


@functools.cache
def load_engine() -> LLMEngine:
    """One engine per worker process, shared by validation and both generation routes."""
    try:
        return start_engine()
    except UserError as e:  # an adapter of lora_modules that cannot be served, say
        sys.exit(f"tailorgpt: error: {e}")


def start_engine() -> LLMEngine:
    return LLMEngine(
        Path(MODEL.resolve().path),
        SETTINGS.variant,
        threads=SETTINGS.threads or None,
        device=SETTINGS.device,
        max_running=SETTINGS.max_running,
        kv_cache_dtype=SETTINGS.kv_cache_dtype,
        max_batch_total_tokens=SETTINGS.max_batch_total_tokens,
        kv_cache_memory_mb=SETTINGS.kv_cache_memory_mb,
        max_queue=SETTINGS.max_queue,
        max_prefill_tokens=SETTINGS.max_prefill_tokens,
        enable_prefix_caching=SETTINGS.enable_prefix_caching,
        name=MODEL_NAME,
        scheduling_policy=SETTINGS.scheduling_policy,
        enable_lora=lora_enabled(SETTINGS),
        lora_modules=lora_modules(SETTINGS),
        max_loras=SETTINGS.max_loras,
        max_lora_rank=SETTINGS.max_lora_rank,
    )


def api_config() -> ApiConfig:
    """The /v1 routes' settings; the chat template is checked here, at start."""
    try:
        template = read_chat_template(Path(MODEL.resolve().path), SETTINGS.chat_template)
    except ChatTemplateError as e:
        sys.exit(f"tailorgpt: error: {e}")
    return ApiConfig(MODEL_NAME, template, SETTINGS.log_prompts, SETTINGS.lora_dir)


def generate_queue_full() -> bool:
    """For /generate's callers, each as it arrives (service/server/guards.py)."""
    full = load_engine().queue_full()
    if full:
        REJECTED.labels(model=MODEL_NAME, reason="queue_full").inc()
    return full


class GenerateRequest(GenerationRequest):
    # The HTTP request's log record: BentoML batches requests of several calls, and each
    # call's log line gets its own request's numbers.
    _record: RequestRecord | None = PrivateAttr(None)

    @model_validator(mode="after")
    def logged_as_its_call(self) -> GenerateRequest:
        self._record = CURRENT.get()
        if self.structured_outputs is not None:  # a bad grammar fails only its own call
            load_engine().grammars.grammar(self.structured_outputs)
        return self

    @field_validator("model")
    @classmethod
    def model_served(cls, model: str | None) -> str | None:
        load_engine().lora_id(model)  # the base or an adapter loaded
        return model

    # Checked per request before batching, so one bad prompt fails only its own call.
    @field_validator("prompt")
    @classmethod
    def prompt_fits(cls, prompt: str) -> str:
        load_engine().prompt_ids(GenerationRequest(prompt=prompt))
        return prompt


CONFIG = api_config()


@bentoml.service(
    name="tailorgpt",
    workers=SETTINGS.workers,
    # Generation takes seconds, and BentoML answers 503 to a request that waits longer
    # than max_latency_ms, so its default is generous; lower it to shed load sooner.
    traffic={"timeout": SETTINGS.max_latency_ms / 1000 + 30},
)
@bentoml.asgi_app(create_app(load_engine, CONFIG), path="/v1")
@bentoml.asgi_app(playground_app(), path="/playground")
@bentoml.asgi_app(docs_app(lambda: TailorGPT.openapi_spec.asdict()), path="/")
@bentoml.asgi_app(create_root_app(load_engine, CONFIG), path="/")
class TailorGPT:
    model = MODEL

    def __init__(self) -> None:
        self.engine = load_engine()
        print(f"tailorgpt: {self.engine.memory}", file=sys.stderr, flush=True)

    def __is_alive__(self) -> bool:
        """/livez: 503 once the engine's loop thread has died, so the pod is restarted."""
        return self.engine.alive()

    @bentoml.on_startup
    def drain_on_sigterm(self) -> None:
        DRAIN.take_over_sigterm()

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    async def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        with ExitStack() as streams:  # leaving it cancels whatever has not finished
            opened = [streams.enter_context(await self._open(r)) for r in requests]
            try:
                return list(await asyncio.gather(*(stream.result() for stream in opened)))
            finally:
                calls: dict[int, tuple[RequestRecord, list]] = {}
                for request, stream in zip(requests, opened, strict=True):
                    if request._record is not None:
                        log = request._record
                        calls.setdefault(id(log), (log, []))[1].append(stream.stats)
                for log, stats in calls.values():
                    log.fields.update(outcome(stats))

    async def _open(self, request: GenerationRequest) -> AsyncStream:
        """Each caller found room in the queue as it arrived (generate_queue_full); one
        merged into a batch that overflows it waits for room rather than fail the batch."""
        while True:
            try:
                return self.engine.open(request)[0]
            except QueueFull:
                await asyncio.sleep(QUEUE_POLL_SECONDS)


TailorGPT.add_asgi_middleware(
    Guards,
    drain=DRAIN,
    max_body=SETTINGS.max_body_bytes,
    api_keys=API_KEYS,
    queue_full=generate_queue_full,
)
