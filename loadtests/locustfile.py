"""Locust scenario for the generation API: varied prompts, lengths and sampling settings,
half through `/generate`, half through OpenAI-style `/v1/completions` streaming.

Headless, bounded in users and time:
  locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:3000 -u 8 -r 4 -t 30s
Locust exits non-zero when any request failed.
Environment: TAILORGPT_LOAD_MAX_NEW_TOKENS (default 64) caps the output lengths drawn.
"""

from __future__ import annotations

import json
import os
import random

from locust import HttpUser, between, task

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
        with self.client.post(
            "/v1/completions", json=body, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            lines = [line for line in response.iter_lines(decode_unicode=True) if line]
            if lines[-1] != "data: [DONE]":
                response.failure(f"stream did not end with [DONE]: {lines[-1:]}")
                return
            usage = json.loads(lines[-2].removeprefix("data: "))["usage"]
            if usage["completion_tokens"] > body["max_tokens"]:
                response.failure(f"unexpected usage: {usage}")
