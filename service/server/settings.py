"""The server's settings: each from its TAILORGPT_* environment variable, else its default.

`tailorgpt serve` has a flag for each (tailorgpt/options.py) that sets the variable; both it
and the service check them here, so a bad value is one line naming the variable, never a
traceback from deep in the server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "TAILORGPT_"


class SettingError(ValueError):
    """A setting with a value it cannot take; the message is one line, naming the variable."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("tailorgpt-demo:latest", description="the BentoML store tag to serve")
    variant: Literal["int8", "fp32", "fp16"] = Field(
        "int8", description="the ONNX model to serve (fp16 needs cuda)"
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda needs onnxruntime-gpu")
    workers: int = Field(1, ge=1, description="worker processes, each with its own engine")
    threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per worker; 0: all the cores it may use"
    )
    max_running: int = Field(32, ge=1, description="most sequences decoding at once")
    kv_cache_dtype: Literal["auto", "fp32", "int8"] = Field(
        "auto",
        description="how the KV cache keeps keys and values: int8 holds 4x the tokens in the "
        "same memory (CPU); auto: int8 for the int8 variant on CPU, else the variant's own",
    )
    kv_cache_memory_mb: int = Field(
        1024, ge=1, description="the KV cache's memory, which sets the KV budget when not given"
    )
    max_batch_total_tokens: int | None = Field(
        None,
        ge=2,
        description="KV budget: prompt + max_new_tokens summed over running ones; unset: what "
        "kv_cache_memory_mb holds, at most max_running full contexts",
    )
    max_queue: int = Field(256, ge=1, description="most requests waiting; beyond it, 503")
    max_prefill_tokens: int = Field(512, ge=1, description="prompt tokens prefilled per step")
    enable_prefix_caching: bool = Field(
        True, description="reuse the cache of prompt starts that requests share"
    )
    enable_lora: bool = Field(
        False,
        description="serve LoRA adapters over the model, each request naming its own as "
        "`model` (on by itself with lora_modules or lora_dir)",
    )
    lora_modules: str = Field(
        "",
        description="adapters served from the start: name=path pairs separated by spaces or "
        "commas (vLLM's --lora-modules)",
    )
    lora_dir: Path | None = Field(
        None,
        description="the directory POST /v1/load_lora_adapter loads adapters from; unset: "
        "adapters load at start only",
    )
    max_loras: int = Field(
        64, ge=1, description="adapters held in memory; past it the least recently used goes"
    )
    max_lora_rank: int = Field(
        8, ge=1, description="the highest adapter rank accepted (a step's LoRA work grows with it)"
    )
    max_batch_size: int = Field(16, ge=1, description="/generate batching: most requests per call")
    max_latency_ms: int = Field(
        120000, ge=1, description="/generate batching: longest wait and run, in milliseconds"
    )
    max_body_bytes: int = Field(2**20, ge=1, description="the largest request body accepted")
    drain_seconds: float = Field(
        50, ge=0, description="on SIGTERM, the longest wait for running requests"
    )
    chat_template: Path | None = Field(
        None, description="a Jinja chat template file, instead of the model's own"
    )
    api_key_file: Path | None = Field(
        None,
        description="a file of API keys, one per line (`name:key`, or a bare key, named key-N), "
        "that /v1, /generate and the token tools require; TAILORGPT_API_KEY gives bare keys "
        "separated by commas instead",
    )
    log_prompts: bool = Field(False, description="put prompts in the request log lines")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="fcfs: first come first served; priority: a request's `priority` first "
        "(lower runs first, as vLLM's), then arrival",
    )


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def settings_from(environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings these environment variables give; SettingError names a bad one."""
    given = {f: environ[env_name(f)] for f in Settings.model_fields if env_name(f) in environ}
    try:
        settings = Settings.model_validate(given)
    except ValidationError as e:
        problem = e.errors()[0]
        field = str(problem["loc"][0])
        raise SettingError(
            f"{env_name(field)} (serve --{field}) = {given.get(field)!r}: {problem['msg']}"
            f" ({Settings.model_fields[field].description})"
        ) from None
    on_gpu = settings.device == "cuda" or settings.variant == "fp16"
    if settings.kv_cache_dtype == "int8" and on_gpu:
        raise SettingError(
            f"{env_name('kv_cache_dtype')} (serve --kv_cache_dtype) = 'int8': the int8 KV cache "
            "runs on the CPU, with the int8 or fp32 variant: use auto or fp32 here"
        )
    lora_modules(settings)  # checked here, read by the service
    if settings.lora_dir is not None and settings.workers > 1:
        raise SettingError(
            f"{env_name('lora_dir')} (serve --lora_dir): adapters loaded at run time reach "
            "one worker's engine only: serve with one worker (the engine uses every core), "
            "or load adapters at start with lora_modules"
        )
    return settings


def lora_modules(settings: Settings) -> dict[str, Path]:
    """The adapters of TAILORGPT_LORA_MODULES by name; SettingError for a malformed pair."""
    modules: dict[str, Path] = {}
    for pair in settings.lora_modules.replace(",", " ").split():
        name, equals, path = pair.partition("=")
        if not equals or not name or not path or name in modules:
            raise SettingError(
                f"{env_name('lora_modules')} (serve --lora_modules): {pair!r} is not a new "
                "name=path pair: give each adapter as name=path, names unique"
            )
        modules[name] = Path(path)
    return modules


def lora_enabled(settings: Settings) -> bool:
    return settings.enable_lora or bool(settings.lora_modules) or settings.lora_dir is not None


KEY_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def api_keys(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The keys clients must send, from TAILORGPT_API_KEY and the key file; none: no check."""
    return list(named_api_keys(settings, environ).values())


def named_api_keys(settings: Settings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The keys by name, for the metrics and the request log (never the key itself): a key
    file line `name:key` names its key; a bare key (a line, or one of TAILORGPT_API_KEY's) is
    `key-N`, N its place among all the keys, those of the variable first."""
    lines = environ.get(PREFIX + "API_KEY", "").split(",")
    if settings.api_key_file is not None:
        try:
            text = settings.api_key_file.read_text(encoding="utf-8")
        except OSError as e:
            raise SettingError(
                f"{env_name('api_key_file')}={str(settings.api_key_file)!r}: cannot read it "
                f"({e.strerror})"
            ) from None
        lines += text.splitlines()
    keys: dict[str, str] = {}
    for line in (x.strip() for x in lines):
        if not line:
            continue
        name, colon, key = line.partition(":")
        if not colon or not KEY_NAME.fullmatch(name.strip()) or not key.strip():
            name, key = f"key-{len(keys) + 1}", line  # a bare key (a colon in it too)
        name, key = name.strip(), key.strip()
        if name in keys:
            raise SettingError(
                f"{env_name('api_key_file')}: the key name {name!r} is given twice: give each "
                "key its own name"
            )
        keys[name] = key
    return keys


def as_environment(values: Mapping[str, object]) -> dict[str, str]:
    """Settings given as values (flags), as the environment variables that carry them."""
    text = {True: "1", False: "0"}
    return {
        env_name(k): text[v] if isinstance(v, bool) else str(v)
        for k, v in values.items()
        if v is not None
    }
