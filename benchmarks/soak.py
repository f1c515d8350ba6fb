"""A soak test of the server: mixed traffic for a long while, watching for errors, leaks and
latency drift.

Closed-loop clients against a real `bentoml serve` of GPT-2 124M (benchmarks/engine.py's
export, 32 slots, 16,384-token KV budget, 2 threads): each request is drawn from the mixed
workload (prompt 8..256 tokens, 16..128 new tokens) and sent as one of
  - a streamed /v1/completions read to the end (half the requests)
  - a whole /generate (a quarter)
  - a streamed /v1/completions whose client leaves after its first few tokens (a quarter)
Reported per window (5 minutes by default): requests, errors (anything but a 200, or a 503
when the queue is full), 503s, TTFT p50/p95 of the streams read to the end, and the serving
processes' RSS at the window's end and its largest.

  .venv/bin/python benchmarks/soak.py --workdir /tmp/tailorgpt-engine-bench [--minutes 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from pathlib import Path

import httpx
from server import mixed, tailorgpt
from transformers import GPT2TokenizerFast

from service.engine import cpu_flags


class RssSeries:
    """RSS of the serving process tree every few seconds."""

    def __init__(self, process: object, every: float = 5.0) -> None:
        self.process, self.samples, self.stop = process, [], threading.Event()
        threading.Thread(target=self._sample, args=(every,), daemon=True).start()

    def _sample(self, every: float) -> None:
        while not self.stop.wait(every):
            tree = [self.process, *self.process.children(recursive=True)]  # type: ignore[attr-defined]
            rss = sum(p.memory_info().rss for p in tree if p.is_running())
            self.samples.append((time.monotonic(), rss))


async def stream(http: httpx.AsyncClient, prompt: str, new: int, leave_after: int) -> dict:
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True}
    started, first, chunks = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                first, chunks = first or time.perf_counter(), chunks + 1
                if leave_after and chunks >= leave_after:
                    return {"status": 200, "left": True}  # closing the stream cancels it
    return {"status": 200, "ttft": (first or time.perf_counter()) - started}


async def whole(http: httpx.AsyncClient, prompt: str, new: int) -> dict:
    body = {"requests": [{"prompt": prompt, "max_new_tokens": new, "temperature": 0}]}
    response = await http.post("/generate", json=body)
    return {"status": response.status_code}


async def soak(url: str, requests: list[tuple[str, int]], clients: int, seconds: float) -> list:
    """(finished at, result) of every request sent in `seconds`."""
    results: list[tuple[float, dict]] = []
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            prompt, new = rng.choice(requests)
            kind = rng.random()
            try:
                if kind < 0.5:
                    result = await stream(http, prompt, new, 0)
                elif kind < 0.75:
                    result = await whole(http, prompt, new)
                else:
                    result = await stream(http, prompt, new, rng.randint(1, 8))
            except httpx.HTTPError as e:
                result = {"status": type(e).__name__}
            results.append((time.monotonic(), result))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http, random.Random(i)) for i in range(clients)))
    return results


def report(results: list, rss: list, started: float, window: float) -> list[dict]:
    rows = []
    windows = int((max(t for t, _ in results) - started) // window) + 1
    for w in range(windows):
        low, high = started + w * window, started + (w + 1) * window
        inside = [r for t, r in results if low <= t < high]
        ttft = [r["ttft"] for r in inside if "ttft" in r]
        memory = [m for t, m in rss if low <= t < high] or [0]
        rows.append(
            {
                "window": f"{w * window / 60:.0f}-{(w + 1) * window / 60:.0f} min",
                "requests": len(inside),
                "errors": sum(r["status"] not in (200, 503) for r in inside),
                "503": sum(r["status"] == 503 for r in inside),
                "left mid-stream": sum(bool(r.get("left")) for r in inside),
                "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
                "ttft_p95": statistics.quantiles(ttft, n=20)[-1] if len(ttft) > 1 else float("nan"),
                "rss_end_mib": memory[-1] / 2**20,
                "rss_max_mib": max(memory) / 2**20,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--window", type=float, default=5, help="minutes a report row covers")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--port", type=int, default=3918)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokenizer = GPT2TokenizerFast(tokenizer_file=str(args.workdir / "tailorgpt" / "tokenizer.json"))
    requests = [(prompt, min(new, 128)) for prompt, new in mixed(tokenizer, 200)]
    print(f"CPU flags: {' '.join(cpu_flags())}; {args.clients} clients, {args.minutes} min")
    with tailorgpt(args.workdir / "tailorgpt", args.port, {}) as peak:
        series = RssSeries(peak.process)
        started = time.monotonic()
        url = f"http://127.0.0.1:{args.port}"
        results = asyncio.run(soak(url, requests, args.clients, args.minutes * 60))
        series.stop.set()
    rows = report(results, series.samples, started, args.window * 60)
    print(
        "\n| window | requests | errors | 503 | left mid-stream | TTFT p50 / p95 (s) "
        "| RSS at end / max (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['window']} | {r['requests']} | {r['errors']} | {r['503']} | "
            f"{r['left mid-stream']} | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
            f"{r['rss_end_mib']:.0f} / {r['rss_max_mib']:.0f} |"
        )
    statuses = sorted({str(r["status"]) for _, r in results})
    print(f"\nstatuses seen: {', '.join(statuses)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
