"""The server under DESIGN.md's mixed workload, through real HTTP: `/v1/completions` streaming
(continuous batching) against `/generate` (BentoML adaptive batching: a batch is answered
when its longest request ends).

Closed-loop clients (1, 8, 32), each request drawn once with seed 0 and replayed identically
on both routes: prompt uniform in 8..256 tokens, max_new_tokens uniform in 16..256, greedy,
EOS ignored. Reported: output tokens/s, time to first token p50/p95 (for /generate, the
whole answer is the first token), time per output token p50, errors, and the peak RSS of
the serving processes. Needs benchmarks/engine.py's workdir (the GPT-2 124M export).

  .venv/bin/python benchmarks/server.py --workdir /tmp/tailorgpt-engine-bench \
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
from pathlib import Path

import httpx
import psutil
from transformers import GPT2TokenizerFast

from training.prepare import read_documents

REPO = Path(__file__).resolve().parent.parent
CLIENTS = (1, 8, 32)
MODEL = "tailorgpt-bench"


def workload(tokenizer: GPT2TokenizerFast, count: int) -> list[tuple[str, int]]:
    """(prompt text of 8..256 tokens, max_new_tokens 16..256) pairs, the same every run."""
    rng = random.Random(0)
    ids = tokenizer(" ".join(read_documents([REPO / "samples" / "corpus"]))).input_ids
    requests = []
    while len(requests) < count:
        length, start = rng.randint(8, 256), rng.randrange(len(ids) - 256)
        text = tokenizer.decode(ids[start : start + length])
        if len(tokenizer(text).input_ids) == length:
            requests.append((text, rng.randint(16, 256)))
    return requests


def start_server(model_dir: Path, port: int, home: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    code = (
        "import bentoml, shutil, sys; from pathlib import Path\n"
        f"with bentoml.models.create('{MODEL}') as m:\n"
        "    for f in Path(sys.argv[1]).iterdir(): shutil.copy(f, m.path)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, check=True)
    env |= {
        "TAILORGPT_MODEL": f"{MODEL}:latest",
        "TAILORGPT_MAX_RUNNING": "32",
        "TAILORGPT_MAX_BATCH_TOTAL_TOKENS": "16384",
        "TAILORGPT_MAX_BATCH_SIZE": "32",
        "TAILORGPT_THREADS": "2",
    }
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("bentoml serve did not become ready")


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
    started, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": 1}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
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

    limits = httpx.Limits(max_connections=clients + 4)
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
    parser.add_argument("--engine-json", type=Path, help="benchmarks/engine.py --json output")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--port", type=int, default=3917)
    args = parser.parse_args()
    model_dir = args.workdir / "tailorgpt"
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    home = Path(tempfile.mkdtemp(prefix="tailorgpt-bench-home-"))
    server = start_server(model_dir, args.port, home)
    rss = PeakRss(server.pid)
    url = f"http://127.0.0.1:{args.port}"
    table = {}
    try:
        for clients in CLIENTS:
            requests = workload(tokenizer, max(6, 3 * clients))
            for route in ("/v1/completions", "/generate"):
                row = asyncio.run(run_level(url, route, clients, requests))
                table[f"{route} x{clients}"] = row
                print(f"{route} clients={clients}: {row}", flush=True)
    finally:
        rss.stop.set()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    print("\n| route | clients | output tok/s | TTFT p50 / p95 (s) | TPOT p50 (ms) | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in table.items():
        route, clients = name.split(" x")
        print(
            f"| {route} | {clients} | {r['output_tokens_per_second']:.1f} | {r['ttft_p50']:.2f} / "
            f"{r['ttft_p95']:.2f} | {r['tpot_p50'] * 1000:.1f} | {r['errors']}/{r['requests']} |"
        )
    top = CLIENTS[-1]
    stream, batch = table[f"/v1/completions x{top}"], table[f"/generate x{top}"]
    ratio = stream["output_tokens_per_second"] / batch["output_tokens_per_second"]
    print(f"\n{top} clients: /v1/completions / /generate output tok/s = {ratio:.2f}x")
    if args.engine_json:
        static = json.loads(args.engine_json.read_text())["tailorgpt int8"][str(top)]
        print(
            f"{top} clients: /v1/completions / engine static batch {top} = "
            f"{stream['output_tokens_per_second'] / static:.2f}x ({static:.1f} tok/s)"
        )
    print(f"peak RSS of the serving processes: {rss.peak / 2**20:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"table": table, "peak_rss_bytes": rss.peak}, indent=2))


if __name__ == "__main__":
    main()
