"""The BentoML service: a thin HTTP shell around the generation engine.

  POST /generate         batchable (BentoML adaptive batching), whole completions
  POST /v1/completions   OpenAI-compatible, `stream: true` for Server-Sent Events
  GET  /v1/models        OpenAI-compatible
  GET  /metrics          Prometheus: BentoML's and the engine's (service/metrics.py)
  GET  /docs.json        OpenAPI 3.1 of all of these (service/openapi.py)

Every route refuses a request body over TAILORGPT_MAX_BODY_BYTES with 413 before reading it,
and on SIGTERM the server drains: new requests and /readyz get 503 with Retry-After, running
requests finish within TAILORGPT_DRAIN_SECONDS, then it exits 0 (service/guards.py).

Both generation routes feed the same engine, which batches continuously. Settings come from
the environment so the same Bento runs anywhere:
  TAILORGPT_MODEL                    store tag to serve (default: the latest tailorgpt-demo)
  TAILORGPT_VARIANT                  int8 (default), fp32, or fp16 (CUDA)
  TAILORGPT_DEVICE                   cpu (default) or cuda
  TAILORGPT_WORKERS                  worker processes, each with its own engine (default 1)
  TAILORGPT_THREADS                  ONNX Runtime threads per worker (default: all cores it may use)
  TAILORGPT_MAX_RUNNING              most sequences decoding at once (default 32)
  TAILORGPT_MAX_BATCH_TOTAL_TOKENS   KV budget: prompt + max_new_tokens summed (default 16384)
  TAILORGPT_MAX_QUEUE                most requests waiting; beyond it, 503 (default 256)
  TAILORGPT_MAX_PREFILL_TOKENS       prompt tokens prefilled per step (default 512)
  TAILORGPT_ENABLE_PREFIX_CACHING    1 (default): reuse the cache of shared prompt starts; 0: off
  TAILORGPT_MAX_BATCH_SIZE           /generate batching: most requests per call (default 16)
  TAILORGPT_MAX_LATENCY_MS           /generate batching: longest wait and run (default 120000)
  TAILORGPT_MAX_BODY_BYTES           largest request body (default 1048576: 64 prompts of a
                                     1024-token context fit several times over)
  TAILORGPT_DRAIN_SECONDS            on SIGTERM, longest wait for running requests (default 50,
                                     within k8s/'s 60 s terminationGracePeriodSeconds)
"""

from __future__ import annotations

import asyncio
import functools
import os
from contextlib import ExitStack
from pathlib import Path

import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import field_validator

from service.engine import Generation, GenerationRequest, LLMEngine, QueueFull
from service.guards import Drain, Guards
from service.openai_api import create_app
from service.openapi import docs_app
from service.playground import playground_app

MODEL_TAG = os.environ.get("TAILORGPT_MODEL", "tailorgpt-demo:latest")
MAX_BATCH_SIZE = int(os.environ.get("TAILORGPT_MAX_BATCH_SIZE", "16"))
# Generation takes seconds, and BentoML answers 503 to a request that waits longer than
# this, so the default is generous; lower it to shed load sooner.
MAX_LATENCY_MS = int(os.environ.get("TAILORGPT_MAX_LATENCY_MS", "120000"))

MODEL = bentoml.models.BentoModel(MODEL_TAG)
MODEL_NAME = MODEL_TAG.split(":")[0]


def _setting(name: str, default: int) -> int:
    return int(os.environ.get(f"TAILORGPT_{name}", default))


DRAIN = Drain(_setting("DRAIN_SECONDS", 50))  # this worker process's


@functools.cache
def load_engine() -> LLMEngine:
    """One engine per worker process, shared by validation and both generation routes."""
    return LLMEngine(
        Path(MODEL.resolve().path),
        os.environ.get("TAILORGPT_VARIANT", "int8"),
        threads=_setting("THREADS", 0) or None,
        device=os.environ.get("TAILORGPT_DEVICE", "cpu"),
        max_running=_setting("MAX_RUNNING", 32),
        max_batch_total_tokens=_setting("MAX_BATCH_TOTAL_TOKENS", 16384),
        max_queue=_setting("MAX_QUEUE", 256),
        max_prefill_tokens=_setting("MAX_PREFILL_TOKENS", 512),
        enable_prefix_caching=bool(_setting("ENABLE_PREFIX_CACHING", 1)),
        name=MODEL_NAME,
    )


class GenerateRequest(GenerationRequest):
    # Checked per request before batching, so one bad prompt fails only its own call.
    @field_validator("prompt")
    @classmethod
    def prompt_fits(cls, prompt: str) -> str:
        load_engine().prompt_ids(GenerationRequest(prompt=prompt))
        return prompt


@bentoml.service(
    name="tailorgpt",
    workers=_setting("WORKERS", 1),
    traffic={"timeout": MAX_LATENCY_MS / 1000 + 30},
)
@bentoml.asgi_app(create_app(load_engine, MODEL_NAME), path="/v1")
@bentoml.asgi_app(playground_app(), path="/playground")
@bentoml.asgi_app(docs_app(lambda: TailorGPT.openapi_spec.asdict()), path="/")
class TailorGPT:
    model = MODEL

    def __init__(self) -> None:
        self.engine = load_engine()

    @bentoml.on_startup
    def drain_on_sigterm(self) -> None:
        DRAIN.take_over_sigterm()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    async def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        with ExitStack() as streams:  # leaving it cancels whatever has not finished
            try:
                opened = [streams.enter_context(self.engine.open(r)[0]) for r in requests]
            except QueueFull as e:
                raise ServiceUnavailable(f"server busy ({e}); retry shortly") from None
            return list(await asyncio.gather(*(stream.result() for stream in opened)))


TailorGPT.add_asgi_middleware(Guards, drain=DRAIN, max_body=_setting("MAX_BODY_BYTES", 2**20))
