"""Locust scenario for the generation API: varied prompts, lengths and sampling settings,
half through `/generate`, half through OpenAI-style `/v1/completions` streaming.

Run it from the repository root with the settings of loadtests/locust.conf (headless, bounded
in users and time, with thresholds), any of them overridden on the command line:
  locust --config loadtests/locust.conf --host http://127.0.0.1:3000 -u 16

Streamed requests also record, as entries of their own (type TOKEN): "time to first token",
from sending the request to the first token's chunk, and "inter-token latency", each gap
between two chunks (one chunk a token, as the server sends them).

Thresholds, 0 for none; past any, Locust exits 1 and logs which:
  --max-error-ratio   failed requests over all (default 0: any failure fails the run)
  --max-p95-ms        p95 of whole requests (streamed ones until their headers)
  --max-ttft-p95-ms   p95 of time to first token
  --max-itl-p95-ms    p95 of inter-token latency
Environment: TAILORGPT_LOAD_MAX_NEW_TOKENS (default 64) caps the output lengths drawn.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from itertools import pairwise

from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.stats import StatsEntry

MAX_NEW_TOKENS = int(os.environ.get("TAILORGPT_LOAD_MAX_NEW_TOKENS", "64"))
SEEDS = [
    "The service",
    "Clean text beats more text because",
    "A checkpoint is",
    "When the validation loss stops falling",
    "用自己的文字训练一个模型",
    "第一步是整理数据。",
    "Deploy the model on Kubernetes and",
]


TOKEN = "TOKEN"  # the type of the entries that time tokens rather than requests
TTFT = "time to first token"
ITL = "inter-token latency"


@events.init_command_line_parser.add_listener
def add_thresholds(parser) -> None:
    for name, what in [
        ("--max-error-ratio", "failed requests over all requests"),
        ("--max-p95-ms", "p95 of whole requests, ms"),
        ("--max-ttft-p95-ms", "p95 of time to first token, ms"),
        ("--max-itl-p95-ms", "p95 of inter-token latency, ms"),
    ]:
        parser.add_argument(name, type=float, default=0.0, help=f"Most {what} (0: no bound)")


def record(environment: Environment, name: str, seconds: float) -> None:
    environment.events.request.fire(
        request_type=TOKEN,
        name=name,
        response_time=seconds * 1000,
        response_length=0,
        exception=None,
        context={},
    )


@events.quitting.add_listener
def check_thresholds(environment: Environment, **_) -> None:
    options, stats = environment.parsed_options, environment.stats
    # Locust's own total counts the token entries too; requests alone are these.
    requests = StatsEntry(stats, "requests", "", use_response_times_cache=False)
    for entry in stats.entries.values():
        if entry.method != TOKEN:
            requests.extend(entry)
    p95 = {
        "max_p95_ms": requests.get_response_time_percentile(0.95),
        "max_ttft_p95_ms": stats.get(TTFT, TOKEN).get_response_time_percentile(0.95),
        "max_itl_p95_ms": stats.get(ITL, TOKEN).get_response_time_percentile(0.95),
    }
    past = [
        f"--{name.replace('_', '-')} {getattr(options, name):g}: was {value:g}"
        for name, value in p95.items()
        if 0 < getattr(options, name) < value
    ]
    if requests.fail_ratio > options.max_error_ratio:
        past.append(f"--max-error-ratio {options.max_error_ratio:g}: was {requests.fail_ratio:.3g}")
    if requests.num_requests == 0:
        past.append("no request finished")
    for line in past:
        logging.error("threshold passed: %s", line)
    # Decide the exit code here, so that failures within --max-error-ratio pass; errors in
    # this file's own code still fail the run.
    environment.process_exit_code = 1 if past or environment.runner.exceptions else 0


def random_prompt() -> str:
    # Repeat a seed to spread prompt lengths from a few tokens to a few dozen.
    return " ".join(random.choice(SEEDS) for _ in range(random.randint(1, 4)))


def random_request() -> dict:
    return {
        "prompt": random_prompt(),
        "max_new_tokens": random.randint(4, MAX_NEW_TOKENS),
        "temperature": random.choice([0.0, 0.7, 1.0]),
        "top_p": random.choice([0.9, 1.0]),
    }


class GenerateUser(HttpUser):
    wait_time = between(0.05, 0.3)

    @task
    def generate(self) -> None:
        request = random_request()
        with self.client.post(
            "/generate", json={"requests": [request]}, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            results = response.json()
            if len(results) != 1 or results[0]["completion_tokens"] > request["max_new_tokens"]:
                response.failure(f"unexpected result: {results}")

    @task
    def stream_completion(self) -> None:
        request = random_request()
        body = {
            "prompt": request["prompt"],
            "max_tokens": request["max_new_tokens"],
            "temperature": request["temperature"],
            "top_p": request["top_p"],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        with self.client.post(
            "/v1/completions", json=body, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            lines, token_times = [], []
            for line in response.iter_lines(decode_unicode=True):
                if not line or line.startswith(":"):  # SSE comments keep a queued stream alive
                    continue
                lines.append(line)
                if line != "data: [DONE]" and json.loads(line.removeprefix("data: "))["choices"]:
                    token_times.append(time.perf_counter())
            if token_times:
                record(self.environment, TTFT, token_times[0] - start)
            for before, after in pairwise(token_times):
                record(self.environment, ITL, after - before)
            if lines[-1] != "data: [DONE]":
                response.failure(f"stream did not end with [DONE]: {lines[-1:]}")
                return
            usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
            if usage["completion_tokens"] > body["max_tokens"]:
                response.failure(f"unexpected usage: {usage}")
