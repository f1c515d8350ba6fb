"""LoRA adapters served unmerged over one base: read and checked, kept in the runner's stacks.

An adapter is a peft GPT-2 LoRA directory (adapter_config.json + adapter_model.safetensors),
tailorgpt's own export of one (the same files and a manifest naming its base) included. Its
weights go into one row of the runner's stacks (export.graph.with_lora), each adapter's
rank padded with zeros to the stack's; B is scaled by alpha / r once, when it loads. The
stacks hold `slots` adapters; past that the least recently used one is evicted, and read
again from its directory when a request names it (vLLM's LRU cache of CPU adapters).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_PROJECTIONS,
    MANIFEST,
    ModelConfig,
    UserError,
    tokenizer_fingerprint,
)
from service.engine import metrics

# peft's key of a LoRA weight of GPT-2, whatever its prefix (base_model.model.transformer...).
WEIGHT_KEY = re.compile(
    r"h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight$"
)
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha when a config leaves it out
# peft features that change more than x @ A @ B, which the serving graph adds.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (whole modules trained beside the adapter)",
    "rank_pattern": "rank_pattern (a rank per module)",
    "alpha_pattern": "alpha_pattern (an alpha per module)",
}


class AdapterError(UserError):
    """An adapter that cannot be served here: one line naming what and what to do."""


class AdapterUnavailable(AdapterError):
    """An evicted adapter that could not be read again (its files gone or changed): raised
    before a step runs anything, so that only its own requests end."""

    def __init__(self, lora_id: int, reason: str) -> None:
        super().__init__(reason)
        self.lora_id = lora_id


@dataclass(frozen=True)
class Base:
    """What an adapter is checked against: the served export."""

    config: ModelConfig
    weights_fingerprint: str | None
    tokenizer_fingerprint: str | None

    @classmethod
    def of(cls, export_dir: Path) -> Base:
        manifest_path = export_dir / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        return cls(
            ModelConfig.read(export_dir),
            manifest.get("weights_fingerprint"),
            tokenizer_fingerprint(export_dir),
        )


def read_adapter(
    directory: Path, base: Base, max_rank: int, digest: str | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """The adapter's weights as the stacks take them: lora_a.<layer>.<projection> [in, r]
    and lora_b... [r, out], B scaled; and a digest of its files. AdapterError, one line, for
    anything this base cannot serve, or (given the digest of an earlier read) files that
    changed since."""
    directory = Path(directory)
    try:
        weights, found = _read_adapter(directory, base, max_rank)
    except AdapterError:
        raise
    except Exception as err:  # a file that is not what it says: never a traceback
        raise AdapterError(f"{directory}: cannot read the adapter ({err!r:.200})") from None
    if digest is not None and found != digest:
        raise AdapterError(
            f"{directory}: the adapter's files changed since it was loaded: load it again "
            "under a new name"
        )
    return weights, found


def _read_adapter(directory: Path, base: Base, max_rank: int) -> tuple[dict[str, np.ndarray], str]:
    config = adapter_config(directory)
    check_base(directory, base)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: r is {rank!r}, not a rank")
    if rank > max_rank:
        raise AdapterError(
            f"{directory}: rank {rank} is over this server's max_lora_rank {max_rank}: serve "
            f"with --max_lora_rank {rank} or more"
        )
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: lora_alpha is {alpha!r}, not a number")
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    weights: dict[str, np.ndarray] = {}
    tensors, digest = read_safetensors(directory / ADAPTER_WEIGHTS)
    for key, tensor in tensors.items():
        match = WEIGHT_KEY.search(key)
        if match is None:
            raise AdapterError(
                f"{directory}: {key} is not a LoRA weight of a GPT-2 projection "
                f"({', '.join(LORA_PROJECTIONS)}): this server serves those only"
            )
        layer, projection, kind = int(match[1]), match[2], match[3]
        if layer >= base.config.n_layer:
            raise AdapterError(
                f"{directory}: {key} is for layer {layer}; the base has {base.config.n_layer}"
            )
        tensor = tensor.astype(np.float32)
        # peft keeps A [r, in] and B [out, r]; the graph multiplies x @ A.T @ B.T.
        name = f"lora_{kind.lower()}.{layer}.{projection}"
        weights[name] = tensor.T if kind == "A" else tensor.T * scaling
    check_shapes(directory, weights, base.config, rank)
    config_bytes = (directory / ADAPTER_CONFIG).read_bytes()
    return weights, hashlib.sha256(config_bytes + digest.encode()).hexdigest()


def adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such directory: pass a LoRA adapter directory")
    if not path.is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(
            f"{directory}: not a LoRA adapter (it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): "
            "pass the output of 'tailorgpt export --adapter' or a peft adapter directory"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{path}: cannot read it ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: not a LoRA adapter config (peft_type LORA)")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise AdapterError(f"{path}: {what} is not supported: train a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{path}: bias {config['bias']!r} trains the base's biases: train with bias 'none'"
        )
    return config


def check_base(directory: Path, base: Base) -> None:
    """tailorgpt's adapter export names its base and tokenizer: both must be the served ones
    (a peft directory names only a hub id, which the shapes check stands in for)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    trained_on = manifest.get("base_fingerprint")
    if trained_on and base.weights_fingerprint is None:
        raise AdapterError(
            f"{directory}: the served export records no weights fingerprint to check the "
            "adapter's base against: export the base again with 'tailorgpt export'"
        )
    if trained_on and trained_on != base.weights_fingerprint:
        raise AdapterError(
            f"{directory}: trained on another base ({manifest.get('base_model')}, weights "
            f"{trained_on}; this server's are {base.weights_fingerprint}): serve it over the "
            "base it was trained on"
        )
    tokenizer = manifest.get("tokenizer_fingerprint")
    if tokenizer and base.tokenizer_fingerprint and tokenizer != base.tokenizer_fingerprint:
        raise AdapterError(
            f"{directory}: trained with another tokenizer than this server's: serve it over "
            "the base it was trained on"
        )


# safetensors' numpy loader has no bfloat16 (numpy has none), and peft saves bf16 adapters
# of bf16 training: the format is an 8-byte header length, a JSON header and raw tensors, so
# it is read here, bf16 widened to float32 (its 16 bits are float32's upper half).
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The tensors of a safetensors file, as float arrays, and the file's digest."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise AdapterError(f"{path}: not a safetensors file (its header is no JSON)") from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise AdapterError(f"{path}: {name} is {entry['dtype']}, not a float type")
        start, end = entry["data_offsets"]
        raw = np.frombuffer(data[8 + size + start : 8 + size + end], dtype=dtype)
        if entry["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.reshape(entry["shape"])
    return tensors, hashlib.sha256(data).hexdigest()


def check_shapes(
    directory: Path, weights: dict[str, np.ndarray], config: ModelConfig, rank: int
) -> None:
    width = config.n_embd
    sizes = {
        "attn.c_attn": (width, 3 * width),
        "attn.c_proj": (width, width),
        "mlp.c_fc": (width, 4 * width),
        "mlp.c_proj": (4 * width, width),
    }
    if not weights:
        raise AdapterError(f"{directory}: the adapter holds no LoRA weights")
    for name, tensor in weights.items():
        kind, layer, projection = name.split(".", 2)
        fan_in, fan_out = sizes[projection]
        expected = (fan_in, rank) if kind == "lora_a" else (rank, fan_out)
        if tensor.shape != expected:
            raise AdapterError(
                f"{directory}: {projection} of layer {layer} is {list(tensor.shape)}, not "
                f"{list(expected)}: the adapter was trained on a GPT-2 of another size"
            )
        other = ("lora_b." if kind == "lora_a" else "lora_a.") + f"{layer}.{projection}"
        if other not in weights:
            raise AdapterError(f"{directory}: {projection} of layer {layer} has A or B only")


class AdapterStack:
    """The stacks a LoRA graph call reads: for each projection, A and B of `slots` adapters
    at `max_rank`, written in place when an adapter loads. np.zeros takes pages as rows are
    written: memory follows the adapters loaded, up to `slots` of them.

    `lock` is held through a step (ensure and the graph calls), so that an adapter loaded
    from another thread never overwrites rows a running call reads."""

    def __init__(
        self,
        dims: dict[str, int],
        slots: int,
        max_rank: int,
        dtype: type,
        reader: Callable[[int], dict[str, np.ndarray]],
        model: str = "",
    ) -> None:
        # A [stack, in, rank] and B [stack, rank, out], `dims` giving in or out.
        self.arrays = {
            name: np.zeros(
                (slots, dim, max_rank) if name.startswith("lora_a") else (slots, max_rank, dim),
                dtype=dtype,
            )
            for name, dim in dims.items()
        }
        self.slots = slots
        self.max_rank = max_rank
        self.slot_bytes = sum(a[0].nbytes for a in self.arrays.values())
        self.resident: OrderedDict[int, int] = OrderedDict()  # lora id -> row, oldest first
        self.reader = reader  # an evicted adapter's weights, read again
        self.lock = threading.RLock()
        self.labels = {"model": model}
        metrics.LORA_MEMORY_BYTES.labels(**self.labels, kind="limit").set(slots * self.slot_bytes)

    def ensure(self, lora_ids: Iterable[int]) -> dict[int, int]:
        """The stack row of each adapter, reading again those evicted; they stay until
        the call ends (the caller holds `lock`)."""
        wanted = set(lora_ids)
        rows = {}
        for lora_id in wanted:
            if lora_id in self.resident:
                self.resident.move_to_end(lora_id)
            else:
                self.add(lora_id, self.reader(lora_id), keep=wanted)
            rows[lora_id] = self.resident[lora_id]
        return rows

    def add(
        self, lora_id: int, weights: dict[str, np.ndarray], keep: set[int] = frozenset()
    ) -> None:
        """Write an adapter into a free row, else into the least recently used one's
        (never one of `keep`)."""
        with self.lock:
            if lora_id in self.resident:
                row = self.resident.pop(lora_id)
            elif len(self.resident) < self.slots:
                row = min(set(range(self.slots)) - set(self.resident.values()))
            else:
                oldest = next(i for i in self.resident if i not in keep)
                row = self.resident.pop(oldest)
                metrics.LORA_EVICTIONS.labels(**self.labels).inc()
            for name, array in self.arrays.items():
                array[row] = 0  # a lower rank's columns past it, or a projection not targeted
                if name in weights:
                    tensor = weights[name]
                    if name.startswith("lora_a"):
                        array[row, :, : tensor.shape[1]] = tensor
                    else:
                        array[row, : tensor.shape[0]] = tensor
            self.resident[lora_id] = row
            self.publish()

    def publish(self) -> None:
        metrics.LORA_ADAPTERS.labels(**self.labels, state="resident").set(len(self.resident))
        resident_bytes = len(self.resident) * self.slot_bytes
        metrics.LORA_MEMORY_BYTES.labels(**self.labels, kind="resident").set(resident_bytes)


@dataclass
class Adapter:
    name: str
    path: Path
    lora_id: int  # unique for the process: a name loaded again is a new adapter
    digest: str  # of its files when loaded: read again after an eviction, they must match


class Adapters:
    """The adapters an engine serves, by name; their weights in the runner's stacks.

    Loading reads and checks the files in the caller's thread; only the copy into the stacks
    waits for the engine's step to end. Unloading forgets the name at once; requests that
    run with it finish with it."""

    def __init__(self, base: Base, max_rank: int, model: str = "") -> None:
        self.labels = {"model": model}
        self.base = base
        self.max_rank = max_rank
        self.by_name: dict[str, Adapter] = {}
        self.by_id: dict[int, Adapter] = {}  # every one loaded, for reading it again
        self.stack: AdapterStack | None = None
        self.lock = threading.Lock()

    def read(self, lora_id: int) -> dict[str, np.ndarray]:
        """An evicted adapter's weights, read again from its directory (the engine thread).
        If they cannot be (files gone or changed), its name is unloaded and
        AdapterUnavailable ends its requests only."""
        adapter = self.by_id[lora_id]
        started = time.perf_counter()
        try:
            weights, _ = read_adapter(adapter.path, self.base, self.max_rank, adapter.digest)
        except AdapterError as err:
            with self.lock:
                if self.by_name.get(adapter.name) is adapter:
                    del self.by_name[adapter.name]
            raise AdapterUnavailable(lora_id, str(err)) from None
        metrics.LORA_LOAD_SECONDS.observe(time.perf_counter() - started)
        return weights

    def load(self, name: str, path: Path) -> Adapter:
        """Serve the adapter at `path` as `name`; AdapterError if it cannot be, and then
        nothing changes."""
        assert self.stack is not None, "the runner's LoRA graph opens first"
        started = time.perf_counter()
        weights, digest = read_adapter(path, self.base, self.max_rank)
        with self.lock:
            if name in self.by_name:
                raise AdapterError(f"{name}: an adapter of this name is loaded: unload it first")
            adapter = Adapter(name, Path(path), len(self.by_id) + 1, digest)
            self.stack.add(adapter.lora_id, weights)
            self.by_name[name] = self.by_id[adapter.lora_id] = adapter
            metrics.LORA_ADAPTERS.labels(**self.labels, state="loaded").set(len(self.by_name))
        metrics.LORA_LOAD_SECONDS.observe(time.perf_counter() - started)
        return adapter

    def unload(self, name: str) -> None:
        with self.lock:
            if self.by_name.pop(name, None) is None:
                raise AdapterError(f"{name}: no adapter of this name is loaded")
            metrics.LORA_ADAPTERS.labels(**self.labels, state="loaded").set(len(self.by_name))

    def lora_id(self, name: str) -> int | None:
        adapter = self.by_name.get(name)
        return adapter.lora_id if adapter else None
