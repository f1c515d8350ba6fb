"""llama.cpp as a benchmark peer: its tools built once from source, the model in q8_0.

The source is the copy the `llama-cpp-python` sdist on PyPI carries under vendor/llama.cpp
(no other registry is reachable here); it is built with cmake for this CPU (GGML_NATIVE) and
cached outside the repository, in ~/.cache/tailorgpt-bench (the first build takes 10-30
minutes on 2 cores). The model is converted with llama.cpp's own convert_hf_to_gguf.py.

  .venv/bin/python benchmarks/llama_cpp_peer.py     # build (if needed) and print the tools' paths
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tailorgpt-bench"
SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-batched-bench", "llama-server")
# No AMX: a CPU may report it while the kernel here refuses its tile state, and ggml built
# for the native CPU then dies of SIGILL at its first matrix product (seen on this machine).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]


def source() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist, downloaded and unpacked once."""
    version = SDIST.split("==")[1]
    root = CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "CMakeLists.txt").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        download = ["download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(CACHE)]
        subprocess.run([sys.executable, "-m", "pip", *download], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{version}.tar.gz") as archive:
            archive.extractall(CACHE, filter="tar")
    return root


def build() -> Path:
    """The directory of the built tools (llama-batched-bench, llama-server)."""
    root = source()
    bin_dir = root / "build" / "bin"
    if all((bin_dir / tool).is_file() for tool in TOOLS):
        return bin_dir
    subprocess.run(["cmake", "-B", "build", *CMAKE_OPTIONS], cwd=root, check=True)
    jobs = str(len(os.sched_getaffinity(0)))
    subprocess.run(
        ["cmake", "--build", "build", "-j", jobs, "--target", *TOOLS], cwd=root, check=True
    )
    return bin_dir


def convert(model_dir: Path, out: Path) -> Path:
    """The Hugging Face GPT-2 in `model_dir` as a q8_0 GGUF file at `out` (made once)."""
    if out.is_file():
        return out
    root = source()
    staged = out.parent / (out.stem + "-src")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(model_dir, staged)
    # The converter reads GPT-2's context from n_ctx, which transformers no longer writes.
    config = json.loads((staged / "config.json").read_text())
    (staged / "config.json").write_text(json.dumps({"n_ctx": config["n_positions"], **config}))
    # It identifies a BPE pre-tokenizer by hashing a sample's token ids, so a tokenizer with
    # GPT-2's pre-tokenizer but its own vocabulary (ours: no hub here) must be named.
    code = (
        "import runpy, sys\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\n"
        "sys.argv = ['convert_hf_to_gguf.py', *sys.argv[1:]]\n"
        "runpy.run_path('convert_hf_to_gguf.py', run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'gguf-py'}"}
    subprocess.run(
        [sys.executable, "-c", code, str(staged), "--outtype", "q8_0", "--outfile", str(out)],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    shutil.rmtree(staged)
    return out


def batched_bench(
    gguf: Path, batch: int, prompt_tokens: int, new_tokens: int, threads: int
) -> tuple[int, float]:
    """(new tokens, seconds) for `batch` sequences of prompt + new tokens, from
    llama-batched-bench's own timing (prompt processing plus generation, load excluded)."""
    tool = build() / "llama-batched-bench"
    context = batch * (prompt_tokens + new_tokens)
    shape = ["-c", str(context), "-npp", str(prompt_tokens), "-ntg", str(new_tokens)]
    threading = ["-t", str(threads), "-tb", str(threads), "-b", "2048", "-ub", "512"]
    result = subprocess.run(
        [
            str(tool),
            "-m",
            str(gguf),
            *shape,
            "-npl",
            str(batch),
            *threading,
            "--output-format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if not rows:
        raise RuntimeError(f"llama-batched-bench printed no result:\n{result.stderr[-3000:]}")
    return batch * new_tokens, float(rows[-1]["t_pp"]) + float(rows[-1]["t_tg"])


def server_command(gguf: Path, port: int, slots: int, kv_tokens: int, threads: int) -> list[str]:
    """llama-server with `slots` parallel sequences sharing one KV cache of `kv_tokens`."""
    return [
        str(build() / "llama-server"),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "-c",
        str(kv_tokens),
        "--kv-unified",
        "-t",
        str(threads),
        "-tb",
        str(threads),
        # One HTTP thread a client: with its default (one a core) the others' connections are
        # dropped unanswered under 32 concurrent streams.
        "--threads-http",
        str(slots + 4),
    ]


if __name__ == "__main__":
    print(build())
