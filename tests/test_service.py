"""The real `bentoml serve` over real HTTP: generation, batching, bad input, metrics, load."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from helpers import REPO, free_port, generate, greedy, metric, tied_to_this_process

from artifacts import ModelConfig

PROMPTS = [
    "Clean text beats more text",
    "用自己的文字训练一个模型",
    "The",
    "When the validation loss stops falling while the training loss keeps falling, the model",
]


def test_generate_answers_in_request_order(server: str) -> None:
    response = generate(server, *[greedy(p) for p in PROMPTS])
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == len(PROMPTS)
    keys = {"text", "prompt_tokens", "completion_tokens", "finish_reason", "logprobs"}
    keys |= {"prompt_logprobs"}
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert set(result) == keys
        assert 0 < result["completion_tokens"] <= 20 or result["finish_reason"] == "stop"
        assert result["finish_reason"] in {"stop", "length"}
        assert result == generate(server, greedy(prompt)).json()[0]  # each in its own place


# README's /generate defaults ("everything but `prompt` optional").
DOCUMENTED_DEFAULTS = {
    "max_new_tokens": 64,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "logprobs": None,
    "prompt_logprobs": None,
    "stop": [],
    "ignore_eos": False,
}


def test_defaults_for_everything_but_the_prompt(server: str) -> None:
    """A prompt alone (and a seed, to compare samples) is answered as if README's defaults
    were sent: the same sampled text, length and fields."""
    response = generate(server, {"prompt": "The", "seed": 5})
    assert response.status_code == 200, response.text
    alone = response.json()[0]
    assert alone == generate(server, {"prompt": "The", "seed": 5, **DOCUMENTED_DEFAULTS}).json()[0]
    assert alone["prompt_tokens"] == 1
    assert alone["logprobs"] is None and alone["prompt_logprobs"] is None
    assert alone["completion_tokens"] == 64 or alone["finish_reason"] == "stop"
    # Sampled at temperature 1, not greedy: other seeds give other texts.
    others = {generate(server, {"prompt": "The", "seed": s}).json()[0]["text"] for s in range(4)}
    assert len(others | {alone["text"]}) > 1


def test_greedy_text_is_the_same_alone_and_batched(server: str) -> None:
    alone = [generate(server, greedy(p)).json()[0]["text"] for p in PROMPTS]
    in_one_call = [r["text"] for r in generate(server, *[greedy(p) for p in PROMPTS]).json()]
    # Concurrent calls: adaptive batching merges them into shared batches.
    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        concurrent = list(pool.map(lambda p: generate(server, greedy(p)), PROMPTS * 2))
    assert in_one_call == alone
    assert [r.json()[0]["text"] for r in concurrent] == alone * 2


def test_seeded_sampling_is_reproducible(server: str) -> None:
    sampled = {"prompt": "The", "max_new_tokens": 16, "temperature": 0.9, "seed": 11}
    first = generate(server, sampled).json()[0]["text"]
    assert generate(server, greedy("Clean"), sampled).json()[1]["text"] == first


def test_bad_requests_get_400_that_says_what_to_change(server: str) -> None:
    cases = [
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": []}, "the prompt is empty"),
        ({"prompt": "The", "max_new_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "The", "max_new_tokens": 100000}, "less than or equal to 4096"),
        ({"prompt": "word " * 400}, "shorten the prompt"),
        ({"prompt": "The", "temperature": -1}, "greater than or equal to 0"),
        ({"prompt": "The", "seed": -5}, "greater than or equal to 0"),
    ]
    for request, message in cases:
        response = generate(server, request)
        assert response.status_code == 400, (request, response.text)
        assert message in response.text, response.text
    missing = requests.post(f"{server}/generate", json={"prompts": []}, timeout=30)
    assert missing.status_code == 400
    assert generate(server, greedy("The")).status_code == 200  # still serving


def test_a_bad_request_does_not_fail_others_batched_with_it(server: str) -> None:
    calls = [greedy("The"), {"prompt": "word " * 400}, greedy("Clean text")] * 3
    with ThreadPoolExecutor(len(calls)) as pool:
        statuses = list(pool.map(lambda r: generate(server, r).status_code, calls))
    assert statuses == [200, 400, 200] * 3


def test_metrics_add_up_across_workers(server: str) -> None:
    generate(server, greedy("The"))  # every metric has a sample from here on
    before = metric(server, "tailorgpt_generated_tokens_total")
    with ThreadPoolExecutor(8) as pool:
        calls = list(pool.map(lambda p: generate(server, greedy(p)).json()[0], PROMPTS * 2))
    produced = sum(c["completion_tokens"] for c in calls)
    assert metric(server, "tailorgpt_generated_tokens_total") - before == produced
    text = requests.get(f"{server}/metrics", timeout=10).text
    for name in (
        "tailorgpt_time_to_first_token_seconds_bucket{",
        "tailorgpt_time_per_output_token_seconds_bucket{",
        "tailorgpt_prompt_tokens_total{",
        "bentoml_service_adaptive_batch_size_bucket{",
    ):
        assert name in text, name
    for gauge in ("queue_length", "running_sequences", "kv_cache_tokens"):
        assert metric(server, f"tailorgpt_{gauge}") == 0  # idle again, summed over workers


def test_health_probes(server: str) -> None:
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{server}/livez", timeout=10).status_code == 200


def test_headless_locust_run_has_no_failures(server: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO / "loadtests" / "locustfile.py"),
            "--headless",
            "--host",
            server,
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "8s",
            "--csv",
            str(tmp_path / "load"),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TAILORGPT_LOAD_MAX_NEW_TOKENS": "16", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stats = (tmp_path / "load_stats.csv").read_text().splitlines()
    header, aggregated = stats[0].split(","), stats[-1].split(",")
    row = dict(zip(header, aggregated, strict=True))
    assert int(row["Request Count"]) > 10
    assert int(row["Failure Count"]) == 0


def test_a_real_prometheus_scrapes_the_service(server: str, tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, (
        "prometheus is missing: `make test` installs it (scripts/install-test-tools.sh)"
    )
    generate(server, greedy("The"))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n"
        f"  - job_name: tailorgpt\n    static_configs:\n"
        f"      - targets: ['{server.removeprefix('http://')}']\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=tied_to_this_process,
    )
    query = "sum(tailorgpt_generated_tokens_total)"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = requests.get(
                    f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5
                ).json()
                if answer["data"]["result"]:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert answer["data"]["result"], "Prometheus scraped no tailorgpt metrics in 60s"
        assert float(answer["data"]["result"][0]["value"][1]) > 0
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_each_worker_prints_its_memory_plan_at_start(server: str, export_dir: Path) -> None:
    config = ModelConfig.read(export_dir)
    per_token = 2 * config.n_layer * config.n_embd  # the int8 cache: a byte a number
    log = (export_dir.parent / "serve.log").read_text()
    plan = (
        f"tailorgpt: KV cache int8, {per_token:,} bytes a token: a budget of "
        f"{4 * config.n_positions:,} tokens takes at most"  # MAX_RUNNING=4 whole contexts
    )
    assert log.count(plan) == 2, log[-3000:]
