r"""Servers under load through real HTTP: this one (with and without its prefix cache and
chunked prefill) against llama.cpp's llama-server, and its two routes against each other.

Workloads (32 closed-loop streaming clients, requests drawn once with seed 0 and replayed
identically on every server; greedy, EOS ignored):
  mixed           DESIGN.md's: prompt uniform in 8..256 tokens, max_new_tokens in 16..256;
                  96 requests on /v1/completions
  chat            a shared 256-token system prompt, then a question of 8..64 tokens; 16..64
                  new; 96 requests on /v1/completions
  multiturn       32 users, 6 turns each, all users at once, each turn sent when the user's
                  last answer has streamed whole; each user has one of 4 system prompts (corpus
                  windows of 200..300 tokens); each turn adds a user message (16..64 tokens)
                  and asks for 64..128 new; every turn resends the conversation. The answers
                  in it are fixed corpus windows of their turn's length, drawn with the rest,
                  not what the server said, so every server sees the same prompts. GPT-2's
                  context is 1,024 tokens, prompt plus reply: a turn that would not fit drops
                  the oldest user message and answer (the system prompt stays), as a chat
                  client's sliding window does. Laid out by the client as one prompt on
                  /v1/completions:
                      System: ...\nUser: ...\nAssistant: ...\nUser: ...\nAssistant:
  multiturn-chat  conversations drawn the same way (seed 1: none of multiturn's prompts in
                  the prefix cache when it runs after it on the same server) as `messages` on
                  /v1/chat/completions, rendered by the server with CHAT_TEMPLATE to the
                  layout above (tailorgpt only; the template's turn starts, e.g. "\nUser:",
                  are stop strings there: output_tokens shows any reply that stopped early)
Servers, one at a time, each with 32 slots on 2 threads:
  tailorgpt          `bentoml serve`, the defaults (int8 KV cache; its budget is what 1 GiB
                     of cache holds, at most 32 whole contexts: 32,768 tokens, 576 MiB)
  tailorgpt-before   no prefix cache and no chunked prefill (what it was before both)
  llama-server       llama.cpp q8_0, --parallel 32 -c 32768 --kv-unified: the same token
                     budget (its f16 cache takes 1,152 MiB of it; with -c 16384 the multiturn
                     workload fills it and it answers "Context size has been exceeded")
                     (built by benchmarks/llama_cpp_peer.py)
  tailorgpt@REV      with --baseline-rev REV: the defaults (before 17: an fp32 cache and a
                     16,384-token budget, 1.1 GiB), the service code of git revision
                     REV (a temporary `git worktree`, same venv), serving the weights as
                     REV's own export (made once into the workdir)
  tailorgpt NAME=V   with --tailorgpt-setting NAME=V (repeatable; NAME=V,NAME2=V2 for one row):
                     the defaults and TAILORGPT_NAME=V, e.g. kv_cache_dtype=int8
Reported: output tokens/s, time to first token p50/p95, time per output token p50, errors,
and the peak RSS of each server's process tree. `--routes` instead compares /v1/completions
(continuous batching) with /generate (BentoML adaptive batching: a batch is answered when its
longest request ends) at 1, 8 and 32 clients. Needs benchmarks/engine.py's workdir (for
tailorgpt alone: engine.tailorgpt_export(workdir) makes it).

  .venv/bin/python benchmarks/server.py --workdir /tmp/tailorgpt-engine-bench
  .venv/bin/python benchmarks/server.py --workdir /tmp/tailorgpt-engine-bench \
      --workloads multiturn,multiturn-chat --baseline-rev HEAD~1 \
      --tailorgpt-setting kv_cache_dtype=fp32,max_batch_total_tokens=16384
  .venv/bin/python benchmarks/server.py --workdir /tmp/tailorgpt-engine-bench --routes \
      [--engine-json engine.json]
A short check: --servers tailorgpt --workloads multiturn,multiturn-chat --clients 4 --turns 2
(--servers '' --baseline-rev REV runs only the baseline.)
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import llama_cpp_peer
import psutil
from transformers import GPT2TokenizerFast

from service.engine import cpu_flags
from service.server.settings import Settings
from training.prepare import read_documents

REPO = Path(__file__).resolve().parent.parent
MODEL = "tailorgpt-bench"
SLOTS, KV_TOKENS, THREADS, CLIENTS, TURNS = 32, 16384, 2, 32, 6
# llama-server's unified cache: tailorgpt's default budget (with 16,384 tokens, 32 users
# of the multiturn workload fill it and it fails requests: "Context size has been exceeded").
LLAMA_KV_TOKENS = 32768
CONTEXT = 1024  # GPT-2's positions: prompt plus reply
Message = dict[str, str]
Request = tuple[str | list[Message], int]  # prompt text or chat messages, max_new_tokens
# What layout() writes, as the server renders `messages` (TAILORGPT_CHAT_TEMPLATE).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


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


def multiturn(
    tokenizer: GPT2TokenizerFast, users: int, turns: int, seed: int = 0
) -> list[list[Request]]:
    """Each user's turns, in order: the conversation so far as chat messages, max_new_tokens."""
    rng, ids = random.Random(seed), corpus_ids(tokenizer)

    def text(n: int) -> str:
        return window(tokenizer, ids, rng, n).strip()

    systems = [text(rng.randint(200, 300)) for _ in range(4)]
    conversations = []
    for _ in range(users):
        history, requests = [{"role": "system", "content": rng.choice(systems)}], []
        for _ in range(turns):
            history.append({"role": "user", "content": text(rng.randint(16, 64))})
            new = rng.randint(64, 128)
            requests.append((fit(tokenizer, history, new), new))
            history.append({"role": "assistant", "content": text(new)})  # not the server's
        conversations.append(requests)
    return conversations


def fit(tokenizer: GPT2TokenizerFast, messages: list[Message], new: int) -> list[Message]:
    """The system prompt and the latest turns that leave `new` tokens of the context."""
    system, turns = messages[0], messages[1:]
    while len(tokenizer(layout([system, *turns])).input_ids) + new > CONTEXT:
        turns = turns[2:]  # the oldest user message and its answer
    return [system, *turns]


def layout(messages: list[Message]) -> str:
    """A conversation as one prompt, as CHAT_TEMPLATE renders it."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


# Each workload: its route and the clients' queues (clients given the same queue share it).
Workload = tuple[str, list[list[Request]]]
WORKLOADS: dict[str, Callable[[GPT2TokenizerFast, argparse.Namespace], Workload]] = {
    "mixed": lambda tok, args: (
        "/v1/completions",
        [mixed(tok, 3 * args.clients)] * args.clients,
    ),
    "chat": lambda tok, args: ("/v1/completions", [chat(tok, 3 * args.clients)] * args.clients),
    "multiturn": lambda tok, args: (
        "/v1/completions",
        [[(layout(m), n) for m, n in user] for user in multiturn(tok, args.clients, args.turns)],
    ),
    "multiturn-chat": lambda tok, args: (
        "/v1/chat/completions",
        multiturn(tok, args.clients, args.turns, seed=1),  # none of multiturn's prompts
    ),
}
TAILORGPT_ONLY = {"multiturn-chat"}


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
def serving(
    command: list[str], env: dict[str, str], port: int, ready: str, cwd: Path = REPO
) -> Iterator[PeakRss]:
    """A server process group for the duration of the block; its peak RSS."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
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
def tailorgpt(
    model_dir: Path, port: int, settings: dict[str, str], tree: Path = REPO
) -> Iterator[PeakRss]:
    """`bentoml serve` of the service in `tree` (a checkout; this one by default)."""
    home = Path(tempfile.mkdtemp(prefix="tailorgpt-bench-home-"))
    (home / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(tree)}
    code = (
        "import bentoml, shutil, sys; from pathlib import Path\n"
        f"with bentoml.models.create('{MODEL}') as m:\n"
        "    for f in Path(sys.argv[1]).iterdir(): shutil.copy(f, m.path)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, check=True)
    env |= {
        "TAILORGPT_MODEL": f"{MODEL}:latest",
        "TAILORGPT_MAX_RUNNING": str(SLOTS),
        "TAILORGPT_MAX_BATCH_SIZE": str(SLOTS),
        "TAILORGPT_THREADS": str(THREADS),
        "TAILORGPT_CHAT_TEMPLATE": str(home / "chat_template.jinja"),
        **settings,
    }
    command = [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)]
    try:
        with serving(command, env, port, "/readyz", cwd=tree) as rss:
            yield rss
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def tailorgpt_at(rev: str, workdir: Path, port: int) -> Iterator[PeakRss]:
    """tailorgpt's defaults with the code of git revision `rev` (a temporary worktree), on
    the same weights exported by that revision's own engine.tailorgpt_export (kept in
    workdir/tailorgpt@COMMIT for the next run)."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    temp = Path(tempfile.mkdtemp(prefix="tailorgpt-bench-rev-"))
    tree, model_dir = temp / "tree", workdir / f"tailorgpt@{commit[:12]}"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True
    )
    try:
        if not (model_dir / "model_int8.onnx").is_file():
            (temp / "work").mkdir()
            (temp / "work" / "gpt2-124m").symlink_to(workdir / "gpt2-124m")
            code = "import engine, pathlib, sys; engine.tailorgpt_export(pathlib.Path(sys.argv[1]))"
            env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'benchmarks'}"}
            subprocess.run(
                [sys.executable, "-c", code, str(temp / "work")], cwd=tree, env=env, check=True
            )
            shutil.move(temp / "work" / "tailorgpt", model_dir)
        with tailorgpt(model_dir, port, {}, tree) as rss:
            yield rss
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)])
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def llama_server(gguf: Path, port: int) -> Iterator[PeakRss]:
    command = llama_cpp_peer.server_command(gguf, port, SLOTS, LLAMA_KV_TOKENS, THREADS)
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


async def one_stream(
    http: httpx.AsyncClient, prompt: str | list[Message], new: int, route: str
) -> dict[str, float]:
    body = {
        "prompt" if route == "/v1/completions" else "messages": prompt,
        "max_tokens": new,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens, chunks = time.perf_counter(), None, 0, 0
    async with http.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            return {"error": 1}
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "choices" not in chunk:  # an error after the stream started
                print(f"{route}: {str(chunk)[:300]}", file=sys.stderr)
                return {"error": 1}
            # chat's first chunk carries the role and no token
            if any("text" in c or c["delta"].get("content") for c in chunk["choices"]):
                first, chunks = first or time.perf_counter(), chunks + 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    tokens = tokens or chunks  # a server without usage in its stream sends a token a chunk
    return {"ttft": first - started, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens}


async def one_generate(http: httpx.AsyncClient, prompt: str, new: int, _: str) -> dict[str, float]:
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


async def run_level(url: str, route: str, queues: list[list[Request]]) -> dict:
    """A closed-loop client a queue, each sending its queue's next request when its last
    answer has ended; clients given the same queue share it. The queues are emptied."""
    call = one_generate if route == "/generate" else one_stream
    clients = len(queues)
    results: list[dict[str, float]] = []

    async def client(http: httpx.AsyncClient, queue: list[Request]) -> None:
        while queue:
            prompt, new = queue.pop(0)
            results.append(await call(http, prompt, new, route))

    # A new connection per request: llama-server closes kept-alive connections after a few
    # requests, and a client reusing one gets "Server disconnected" (same for every server).
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[client(http, queue) for queue in queues])
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
        "output_tokens": sum(r["tokens"] for r in ok),
        "requests": len(results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tailorgpt-engine-bench"))
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument(
        "--baseline-rev", help="also serve the code of this git revision (tailorgpt@REV)"
    )
    parser.add_argument(
        "--tailorgpt-setting",
        action="append",
        default=[],
        metavar="NAME=V[,NAME=V]",
        help="also serve tailorgpt with TAILORGPT_NAME=V (a row each time given)",
    )
    parser.add_argument("--clients", type=int, default=CLIENTS, help="fewer for a short check")
    parser.add_argument("--turns", type=int, default=TURNS, help="multiturn: turns a user")
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


def server_rows(args: argparse.Namespace) -> dict[str, Callable[[Path, int], Any]]:
    """The servers to run, by name: --servers, then --baseline-rev's and --tailorgpt-setting's."""
    servers = {name: SERVERS[name] for name in args.servers.split(",") if name}
    if args.baseline_rev:
        rev = args.baseline_rev
        servers[f"tailorgpt@{rev}"] = lambda workdir, port: tailorgpt_at(rev, workdir, port)
    for given in args.tailorgpt_setting:
        env = {}
        for setting in given.split(","):
            name, _, value = setting.partition("=")
            if name not in Settings.model_fields:
                print(f"{setting}: not a setting of this checkout: the server ignores it")
            env[f"TAILORGPT_{name.upper()}"] = value
        servers[f"tailorgpt {given}"] = lambda workdir, port, env=env: tailorgpt(
            workdir / "tailorgpt", port, env
        )
    return servers


def compare_servers(args: argparse.Namespace, tokenizer: GPT2TokenizerFast) -> dict:
    table: dict[str, dict] = {}
    servers, workloads = server_rows(args), args.workloads.split(",")
    for server, start in servers.items():
        with start(args.workdir, args.port) as rss:
            names = [
                w for w in workloads if server.startswith("tailorgpt") or w not in TAILORGPT_ONLY
            ]
            for name in names:
                route, queues = WORKLOADS[name](tokenizer, args)
                row = asyncio.run(run_level(url(args), route, queues))
                table[f"{server} {name}"] = row
                print(f"{server} {name}: {row}", flush=True)
            for name in names:
                table[f"{server} {name}"]["peak_rss_mib"] = rss.peak / 2**20
    print(f"\n{args.clients} streaming clients (multiturn: users, {args.turns} turns each)\n")
    print(f"| server | workload | {HEADER} | peak RSS (MiB) |")
    print("| --- | --- |" + " --- |" * 5)
    for key, r in table.items():
        server, _, workload = key.rpartition(" ")
        print(f"| {server} | {workload} | {cells(r)} | {r['peak_rss_mib']:.0f} |")
    for workload in workloads:
        for server in servers:
            ours, theirs = table.get(f"tailorgpt {workload}"), table.get(f"{server} {workload}")
            if ours and theirs and server != "tailorgpt":
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
                row = asyncio.run(run_level(url(args), route, [list(requests)] * clients))
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
