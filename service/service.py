"""The BentoML service: a thin HTTP shell around the ONNX Runtime generation engine.

Settings come from the environment so the same Bento runs anywhere:
  TAILORGPT_MODEL            store tag to serve (default: the latest tailorgpt-demo)
  TAILORGPT_VARIANT          int8 (default) or fp32
  TAILORGPT_MAX_BATCH_SIZE   adaptive batching: most requests in one batch (default 16)
  TAILORGPT_MAX_LATENCY_MS   adaptive batching: longest a request may wait and run (default 120000)
  TAILORGPT_THREADS          ONNX Runtime threads (default: all cores this process may use)
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import bentoml
from prometheus_client import Counter, Histogram
from pydantic import field_validator

from service.engine import Generation, GenerationRequest, OnnxGenerator

MODEL_TAG = os.environ.get("TAILORGPT_MODEL", "tailorgpt-demo:latest")
VARIANT = os.environ.get("TAILORGPT_VARIANT", "int8")
MAX_BATCH_SIZE = int(os.environ.get("TAILORGPT_MAX_BATCH_SIZE", "16"))
# Generation takes seconds, and BentoML answers 503 to a request that waits longer than
# this, so the default is generous; lower it to shed load sooner.
MAX_LATENCY_MS = int(os.environ.get("TAILORGPT_MAX_LATENCY_MS", "120000"))
THREADS = int(os.environ.get("TAILORGPT_THREADS", "0")) or None

MODEL = bentoml.models.BentoModel(MODEL_TAG)

PROMPT_TOKENS = Counter("tailorgpt_prompt_tokens", "Prompt tokens received", ["model"])
GENERATED_TOKENS = Counter("tailorgpt_generated_tokens", "Tokens generated", ["model"])
GENERATION_SECONDS = Histogram(
    "tailorgpt_generation_seconds",
    "Time to generate one request's completion (its whole batch)",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)


@functools.cache
def load_engine() -> OnnxGenerator:
    """One engine per worker process, shared by request validation and generation."""
    return OnnxGenerator(Path(MODEL.resolve().path), variant=VARIANT, threads=THREADS)


class GenerateRequest(GenerationRequest):
    # Checked per request before batching, so one bad prompt fails only its own call.
    @field_validator("prompt")
    @classmethod
    def prompt_fits_context(cls, prompt: str) -> str:
        load_engine().check_prompt(prompt)
        return prompt


@bentoml.service(name="tailorgpt", traffic={"timeout": MAX_LATENCY_MS / 1000 + 30})
class TailorGPT:
    model = MODEL

    def __init__(self) -> None:
        self.engine = load_engine()
        self.model_name = str(self.model.tag)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, requests: list[GenerateRequest]) -> list[Generation]:
        started = time.perf_counter()
        results = self.engine.generate(requests)
        elapsed = time.perf_counter() - started
        for result in results:
            PROMPT_TOKENS.labels(self.model_name).inc(result.prompt_tokens)
            GENERATED_TOKENS.labels(self.model_name).inc(result.completion_tokens)
            GENERATION_SECONDS.labels(self.model_name).observe(elapsed)
        return results
