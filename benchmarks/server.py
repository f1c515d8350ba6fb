"""Servers under load through real HTTP: this one (with and without its prefix cache and
chunked prefill) against llama.cpp's llama-server, and its two routes against each other.

Workloads (closed-loop streaming clients, requests drawn once with seed 0 and replayed
identically on every server; greedy, EOS ignored):
  mixed  DESIGN.md's: prompt uniform in 8..256 tokens, max_new_tokens uniform in 16..256
  chat   a shared 256-token system prompt, then a question of 8..64 tokens; 16..64 new
Servers, one at a time, each with 32 slots and a 16,384-token KV budget on 2 threads:
  tailorgpt          `bentoml serve`, the defaults
  tailorgpt-before   no prefix cache and no chunked prefill (what it was before both)
  llama-server       llama.cpp q8_0, --parallel 32 -c 16384 --kv-unified
                     (built by benchmarks/llama_cpp_peer.py)
Reported: output tokens/s, time to first token p50/p95, time per output token p50, errors,
and the peak RSS of each server's process tree. `--routes` instead compares /v1/completions
(continuous batching) with /generate (BentoML adaptive batching: a batch is answered when its
longest request ends) at 1, 8 and 32 clients. Needs benchmarks/engine.py's workdir.

  .venv/bin/python benchmarks/server.py --workdir /tmp/tailorgpt-engine-bench
  .venv/bin/python benchmarks/server.py --workdir /tmp/tailorgpt-engine-bench --routes \
      [--engine-json engine.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import llama_cpp_peer
import psutil
from transformers import GPT2TokenizerFast

from service.engine import cpu_flags
from training.prepare import read_documents

REPO = Path(__file__).resolve().parent.parent
MODEL = "tailorgpt-bench"
SLOTS, KV_TOKENS, THREADS, CLIENTS = 32, 16384, 2, 32
Request = tuple[str, int]  # prompt text, max_new_tokens


def corpus_ids(tokenizer: GPT2TokenizerFast) -> list[int]:
    return tokenizer(" ".join(read_documents([REPO / "samples" / "corpus"]))).input_ids


def window(tokenizer: GPT2TokenizerFast, ids: list[int], rng: random.Random, n: int) -> str:
    """Text of n corpus tokens that encodes back to n tokens."""
    while True:
        start = rng.randrange(len(ids) - n)
        text = tokenizer.decode(ids[start : start + n])
        if len(tokenizer(text).input_ids) == n:
            return text


def mixed(tokenizer: GPT2TokenizerFast, count: int) -> list[Request]:
    rng, ids = random.Random(0), corpus_ids(tokenizer)
    return [
        (window(tokenizer, ids, rng, rng.randint(8, 256)), rng.randint(16, 256))
        for _ in range(count)
    ]


def chat(tokenizer: GPT2TokenizerFast, count: int) -> list[Request]:
    rng, ids = random.Random(0), corpus_ids(tokenizer)
    system = "System: " + window(tokenizer, ids, rng, 256) + "\nUser: "
    return [
        (
            system + window(tokenizer, ids, rng, rng.randint(8, 64)) + "\nAssistant:",
            rng.randint(16, 64),
        )
        for _ in range(count)
    ]


WORKLOADS = {"mixed": mixed, "chat": chat}


def wait_ready(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    for _ in range(480):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + path).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


@contextmanager
def serving(command: list[str], env: dict[str, str], port: int, ready: str) -> Iterator[PeakRss]:
    """A server process group for the duration of the block; its peak RSS."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, ready)
        rss = PeakRss(process.pid)
        yield rss
        rss.stop.set()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def tailorgpt(model_dir: Path, port: int, settings: dict[str, str]) -> Iterator[PeakRss]:
    home = Path(tempfile.mkdtemp(prefix="tailorgpt-bench-home-"))
    env = {**os.environ, "BENTOML_HOME": str(home)}
    code = (
        "import bentoml, shutil, sys; from pathlib import Path\n"
        f"with bentoml.models.create('{MODEL}') as m:\n"
        "    for f in Path(sys.argv[1]).iterdir(): shutil.copy(f, m.path)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, check=True)
    env |= {
        "TAILORGPT_MODEL": f"{MODEL}:latest",
        "TAILORGPT_MAX_RUNNING": str(SLOTS),
        "TAILORGPT_MAX_BATCH_TOTAL_TOKENS": str(KV_TOKENS),
        "TAILORGPT_MAX_BATCH_SIZE": str(SLOTS),
        "TAILORGPT_THREADS": str(THREADS),
        **settings,
    }
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    try:
        with serving(command, env, port, "/readyz") as rss:
            yield rss
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def llama_server(gguf: Path, port: int) -> Iterator[PeakRss]:
    command = llama_cpp_peer.server_command(gguf, port, SLOTS, KV_TOKENS, THREADS)
    with serving(command, dict(os.environ), port, "/health") as rss:
        yield rss


SERVERS = {
    "tailorgpt": lambda workdir, port: tailorgpt(workdir / "tailorgpt", port, {}),
    "tailorgpt-before": lambda workdir, port: tailorgpt(
        workdir / "tailorgpt",
        port,
        {"TAILORGPT_ENABLE_PREFIX_CACHING": "0", "TAILORGPT_MAX_PREFILL_TOKENS": str(KV_TOKENS)},
    ),
    "llama-server": lambda workdir, port: llama_server(workdir / "llama-q8_0.gguf", port),
}


class PeakRss:
    """Largest resident memory of the server's process tree, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            tree = [self.process, *self.process.children(recursive=True)]
            self.peak = max(self.peak, sum(p.memory_info().rss for p in tree if p.is_running()))


async def one_stream(http: httpx.AsyncClient, prompt: str, new: int) -> dict[str, float]:
    body = {
        "prompt": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens, chunks = time.perf_counter(), None, 0, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": 1}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                first, chunks = first or time.perf_counter(), chunks + 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    tokens = tokens or chunks  # a server without usage in its stream sends a token a chunk
    return {"ttft": first - started, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens}


async def one_generate(http: httpx.AsyncClient, prompt: str, new: int) -> dict[str, float]:
    body = {
        "requests": [
            {"prompt": prompt, "max_new_tokens": new, "temperature": 0, "ignore_eos": True}
        ]
    }
    started = time.perf_counter()
    response = await http.post("/generate", json=body)
    if response.status_code != 200:
        return {"error": 1}
    latency, tokens = time.perf_counter() - started, response.json()[0]["completion_tokens"]
    return {"ttft": latency, "tpot": latency / tokens, "tokens": tokens}


async def run_level(url: str, route: str, clients: int, requests: list[tuple[str, int]]) -> dict:
    call = one_stream if route == "/v1/completions" else one_generate
    queue = list(requests)
    results: list[dict[str, float]] = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            prompt, new = queue.pop(0)
            results.append(await call(http, prompt, new))

    # A new connection per request: llama-server closes kept-alive connections after a few
    # requests, and a client reusing one gets "Server disconnected" (same for every server).
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]

    def pct(key: str, q: int) -> float:
        return (
            statistics.quantiles([r[key] for r in ok], n=100)[q - 1] if len(ok) > 1 else ok[0][key]
        )

    return {
        "output_tokens_per_second": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": pct("ttft", 50),
        "ttft_p95": pct("ttft", 95),
        "tpot_p50": pct("tpot", 50),
        "errors": len(results) - len(ok),
        "requests": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--routes", action="store_true", help="compare the two routes instead")
    parser.add_argument("--engine-json", type=Path, help="benchmarks/engine.py --json output")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--port", type=int, default=3917)
    args = parser.parse_args()
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(args.workdir / "tailorgpt" / "tokenizer.json"))
    print(f"CPU flags: {' '.join(cpu_flags())}; {THREADS} threads a server", flush=True)
    table = compare_routes(args, tokenizer) if args.routes else compare_servers(args, tokenizer)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


def compare_servers(args: argparse.Namespace, tokenizer: GPT2TokenizerFast) -> dict:
    table: dict[str, dict] = {}
    for server in args.servers.split(","):
        with SERVERS[server](args.workdir, args.port) as rss:
            for name in args.workloads.split(","):
                requests = WORKLOADS[name](tokenizer, 3 * CLIENTS)
                row = asyncio.run(run_level(url(args), "/v1/completions", CLIENTS, requests))
                table[f"{server} {name}"] = row
                print(f"{server} {name}: {row}", flush=True)
            for name in args.workloads.split(","):
                table[f"{server} {name}"]["peak_rss_mib"] = rss.peak / 2**20
    print(f"\n{CLIENTS} streaming clients on /v1/completions\n")
    print(f"| server | workload | {HEADER} | peak RSS (MiB) |")
    print("| --- | --- |" + " --- |" * 5)
    for key, r in table.items():
        print(f"| {' | '.join(key.split(' '))} | {cells(r)} | {r['peak_rss_mib']:.0f} |")
    for workload in args.workloads.split(","):
        for server in args.servers.split(","):
            ours, theirs = table.get(f"tailorgpt {workload}"), table[f"{server} {workload}"]
            if ours and server != "tailorgpt":
                rate = "output_tokens_per_second"
                print(
                    f"{workload}: tailorgpt / {server}: output tok/s "
                    f"{ours[rate] / theirs[rate]:.2f}x, TTFT p50 "
                    f"{theirs['ttft_p50'] / ours['ttft_p50']:.2f}x and p95 "
                    f"{theirs['ttft_p95'] / ours['ttft_p95']:.2f}x shorter"
                )
    return table


def compare_routes(args: argparse.Namespace, tokenizer: GPT2TokenizerFast) -> dict:
    table: dict[str, dict] = {}
    with SERVERS["tailorgpt"](args.workdir, args.port) as rss:
        for clients in (1, 8, CLIENTS):
            requests = mixed(tokenizer, max(6, 3 * clients))
            for route in ("/v1/completions", "/generate"):
                row = asyncio.run(run_level(url(args), route, clients, requests))
                table[f"{route} x{clients}"] = row
                print(f"{route} clients={clients}: {row}", flush=True)
    print(f"\n| route | clients | {HEADER} |")
    print("| --- | --- |" + " --- |" * 4)
    for name, r in table.items():
        print(f"| {' | '.join(name.split(' x'))} | {cells(r)} |")
    stream, batch = table[f"/v1/completions x{CLIENTS}"], table[f"/generate x{CLIENTS}"]
    ratio = stream["output_tokens_per_second"] / batch["output_tokens_per_second"]
    print(f"\n{CLIENTS} clients: /v1/completions / /generate output tok/s = {ratio:.2f}x")
    if args.engine_json:
        static = statistics.median(
            json.loads(args.engine_json.read_text())["tailorgpt int8"][str(CLIENTS)]
        )
        print(
            f"{CLIENTS} clients: /v1/completions / engine static batch {CLIENTS} = "
            f"{stream['output_tokens_per_second'] / static:.2f}x ({static:.1f} tok/s)"
        )
    print(f"peak RSS of the serving processes: {rss.peak / 2**20:.0f} MiB")
    return table


HEADER = "output tok/s | TTFT p50 / p95 (s) | TPOT p50 (ms) | errors"


def cells(r: dict) -> str:
    return (
        f"{r['output_tokens_per_second']:.1f} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
        f"{r['tpot_p50'] * 1000:.1f} | {r['errors']}/{r['requests']}"
    )


def url(args: argparse.Namespace) -> str:
    return f"http://127.0.0.1:{args.port}"


if __name__ == "__main__":
    main()
