"""How one step runs: an ONNX Runtime session over a preallocated KV cache, through IOBinding.

The cache holds one slot per running sequence, [slots, heads, max_seq, head_dim] per layer
for keys and values. Past and present are bound to the same memory, so a step writes only
the new positions; nothing is copied or reallocated between steps. The slot dimension is
outermost, so consecutive slots are one contiguous block: a call binds the slots from its
lowest row to its highest, and those between without new tokens sit it out.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from artifacts import VARIANT_FILES, ModelConfig, UserError, graph_name, lora_file
from service.engine.lora import AdapterStack


@dataclass
class Chunk:
    """A slot's new tokens for one step: a decoding row's one token, or part of a prompt."""

    slot: int
    token_ids: Sequence[int]
    start: int  # tokens the slot's cache holds before them: the first one's position
    every_position: bool = False  # logits after each token (prompt scores), else the last
    lora_id: int = 0  # the adapter whose update its tokens get (service.engine.lora); 0: none


# A padded place of the attention layout costs a copy of a query, key and value and some
# attention work. GPT-2 124M int8 on 2 cores, 32 decoding rows beside one prompt chunk: one
# call costs what two do for a chunk of 16-64 tokens (up to 1,952 padded places), 6% more
# for 128 and 13% more for 256. Past this many places holding no token, two calls.
PADDING_LIMIT = 2048
# Likewise for the LoRA update, whose groups (one per adapter) are padded to the largest: a
# long prompt chunk of one adapter beside decoding rows of others runs in a call of its own.
LORA_PADDING_LIMIT = 256


def plan_calls(chunks: list[Chunk], context: int) -> list[list[Chunk]]:
    """The graph calls that run `chunks`: one when the padding stays under PADDING_LIMIT,
    else the one-token rows in one call and the prompt chunks in runs of neighbouring slots.
    A call's padded width must also fit the cache after each row's tokens."""

    def fits(call: list[Chunk]) -> bool:
        slots = max(c.slot for c in call) - min(c.slot for c in call) + 1
        width = max(len(c.token_ids) for c in call)
        padding = slots * width - sum(len(c.token_ids) for c in call)
        return (
            padding <= PADDING_LIMIT
            and lora_padding(call) <= LORA_PADDING_LIMIT
            and all(c.start + width <= context for c in call)
        )

    if fits(chunks):
        return [chunks]
    decoding = [c for c in chunks if len(c.token_ids) == 1]
    calls = [decoding] if decoding else []
    for chunk in sorted((c for c in chunks if len(c.token_ids) > 1), key=lambda c: c.slot):
        if calls and calls[-1] is not decoding and fits([*calls[-1], chunk]):
            calls[-1].append(chunk)
        else:
            calls.append([chunk])
    return calls


def share_thread_pool(options: ort.SessionOptions, threads: int) -> None:
    """Run the sessions of `options` on the process's one onnxruntime thread pool, made by
    the first runner that needs it with its thread count. A runner with LoRA alternates
    between two sessions: each with a pool of its own, the idle one's threads spun on the
    cores the other needed, and a decoding step of GPT-2 124M took up to 1.7x as long after
    a switch (BENCHMARKS.md, "LoRA adapters"). Once the pool exists, onnxruntime takes no
    session with a pool of its own: every later runner of the process shares it too."""
    global _THREAD_POOL
    if _THREAD_POOL is None:
        # onnxruntime's Python binding exposes the global pools only here.
        from onnxruntime.capi._pybind_state import set_global_thread_pool_sizes

        _THREAD_POOL = threads
        set_global_thread_pool_sizes(threads, 1)
    options.use_per_session_threads = False


_THREAD_POOL: int | None = None


def lora_groups(chunks: list[Chunk]) -> dict[int, list[int]]:
    """The packed tokens of each adapter in a call (chunks in call order), base tokens left out."""
    groups: dict[int, list[int]] = {}
    offset = 0
    for chunk in chunks:
        count = len(chunk.token_ids)
        if chunk.lora_id:
            groups.setdefault(chunk.lora_id, []).extend(range(offset, offset + count))
        offset += count
    return groups


def lora_padding(chunks: list[Chunk]) -> int:
    groups = lora_groups(chunks)
    width = max(map(len, groups.values()), default=0)
    return len(groups) * width - sum(map(len, groups.values()))


class KVCache:
    """Keys and values of every layer, one slot per sequence.

    On the CPU the cache is anonymous memory: pages cost RAM only once written, and a freed
    slot hands its pages back, so memory follows the tokens actually held, not the maximum.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        heads: int,
        max_seq: int,
        head_dim: int,
        dtype: type,
        device: str,
    ) -> None:
        self.shape = (slots, heads, max_seq, head_dim)
        self.dtype = np.dtype(dtype)
        self.bytes_per_token = 2 * layers * heads * head_dim * self.dtype.itemsize
        self.slot_bytes = heads * max_seq * head_dim * self.dtype.itemsize
        self.tensor_bytes = slots * self.slot_bytes
        self.tensors = 2 * layers
        self.device = device
        if device == "cpu":
            self._memory = mmap.mmap(-1, self.tensors * self.tensor_bytes)
            self._array = np.frombuffer(self._memory, dtype=self.dtype)
            self._base = self._array.ctypes.data
        else:
            self._value = ort.OrtValue.ortvalue_from_shape_and_type(
                (self.tensors * slots * heads * max_seq * head_dim,), self.dtype, device, 0
            )
            self._base = self._value.data_ptr()

    def address(self, tensor: int, slot: int) -> int:
        return self._base + tensor * self.tensor_bytes + slot * self.slot_bytes

    def view(self, tensor: int) -> np.ndarray:
        """One layer's keys (even tensors) or values (odd), [slots, heads, max_seq, head_dim]
        (CPU)."""
        per_tensor = self.tensor_bytes // self.dtype.itemsize
        return self._array[tensor * per_tensor : (tensor + 1) * per_tensor].reshape(self.shape)

    def copy(self, source: int, target: int, tokens: int) -> None:
        """The first `tokens` positions of every layer's keys and values, from one slot to
        another (CPU): a fork or a cached prefix starts from a copy of them."""
        for tensor in range(self.tensors):
            cache = self.view(tensor)
            cache[target, :, :tokens] = cache[source, :, :tokens]

    def release(self, slot: int) -> None:
        """Give a freed slot's pages back to the system (CPU only; they read as zeros after)."""
        if self.device != "cpu" or self.slot_bytes % mmap.PAGESIZE:
            return
        for tensor in range(self.tensors):
            self._memory.madvise(
                mmap.MADV_DONTNEED,
                tensor * self.tensor_bytes + slot * self.slot_bytes,
                self.slot_bytes,
            )


class ModelRunner:
    def __init__(
        self,
        model_dir: Path,
        variant: str = "int8",
        slots: int = 32,
        threads: int | None = None,
        device: str = "cpu",
        kv_cache_dtype: str = "fp32",
    ) -> None:
        config = ModelConfig.read(model_dir)
        self.context = config.n_positions
        self.vocab_size = config.vocab_size
        self.layers = config.n_layer
        self.eos_token_id = config.eos_token_id
        heads = config.n_head
        self.slots = slots
        self.device = device
        self.options = ort.SessionOptions()
        self.threads = threads or len(os.sched_getaffinity(0))
        if _THREAD_POOL is None:
            self.options.intra_op_num_threads = self.threads
        else:  # a LoRA runner made the process's pool
            share_thread_pool(self.options, self.threads)
        self.providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.graph = graph_name(variant, kv_cache_dtype)
        self.path = path = Path(model_dir) / VARIANT_FILES.get(self.graph, f"{self.graph}.onnx")
        if not path.is_file():
            raise UserError(
                f"{model_dir} has no {variant} graph with an {kv_cache_dtype} KV cache "
                f"({path.name}): export it again with 'tailorgpt export', or choose another "
                "variant or kv_cache_dtype"
            )
        self.session = ort.InferenceSession(str(path), self.options, providers=self.providers)
        # Both graphs of a variant read its one weights file.
        weights = [path, Path(model_dir) / (VARIANT_FILES[variant] + "_data")]
        self.weights_bytes = sum(file.stat().st_size for file in weights if file.is_file())
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "query_seqlens" not in inputs:
            raise UserError(
                f"{model_dir} was exported by an older tailorgpt (no mixed steps): export it "
                "again with 'tailorgpt export'"
            )
        cache_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        dtype = {**cache_types, "tensor(int8)": np.int8}[inputs["past_key.0"].type]
        self.cache = KVCache(
            self.layers,
            slots,
            heads,
            self.context,
            config.n_embd // heads,
            dtype,
            device,
        )
        self.logits = np.empty((slots, 1, self.vocab_size), dtype=np.float32)
        self.binding = self.session.io_binding()
        self.adapters: AdapterStack | None = None  # with enable_lora
        self.lora_session: ort.InferenceSession | None = None

    def enable_lora(
        self,
        slots: int,
        max_rank: int,
        reader: Callable[[int], dict[str, np.ndarray]],
        model: str = "",
    ) -> AdapterStack:
        """Open the graph's LoRA twin and the adapter stacks it reads (`slots` adapters of
        rank up to `max_rank`). A second session: its weights take their memory again
        (onnxruntime's Python API shares no prepacked weights between sessions), which the
        base-only steps' speed is worth: they keep running the graph without the updates."""
        path = self.path.with_name(lora_file(self.path.name))
        if not path.is_file():
            raise UserError(
                f"{self.path.parent} has no LoRA graph ({path.name}): export it again with "
                "'tailorgpt export' to serve adapters over it"
            )
        if self.options.use_per_session_threads:
            # Opened again on the shared pool: one pool per session thrashed (see there).
            self.options = ort.SessionOptions()
            share_thread_pool(self.options, self.threads)
            self.session = ort.InferenceSession(
                str(self.path), self.options, providers=self.providers
            )
            self.binding = self.session.io_binding()
        self.lora_session = ort.InferenceSession(str(path), self.options, providers=self.providers)
        dims = {
            i.name: i.shape[1] if i.name.startswith("lora_a") else i.shape[2]
            for i in self.lora_session.get_inputs()
            if i.name.startswith(("lora_a.", "lora_b."))
        }
        dtype = np.float16 if self.cache.dtype == np.float16 else np.float32
        self.adapters = AdapterStack(dims, slots, max_rank, dtype, reader, model)
        self.lora_binding = self.lora_session.io_binding()
        return self.adapters

    def release(self, slot: int) -> None:
        """A sequence has left `slot`: its cache pages go back to the system."""
        self.cache.release(slot)

    def fork(self, source: int, target: int, tokens: int) -> None:
        self.cache.copy(source, target, tokens)

    def run(self, chunks: list[Chunk]) -> list[np.ndarray]:
        """One step: each chunk's new tokens into its slot's cache; the logits of each
        chunk's last token, [1, vocab], or with `every_position` of each, [tokens, vocab].
        Decoding rows and prompt chunks share a call (weights read once) unless the padding
        the attention layout needs would cost more (see `plan_calls`)."""
        logits: dict[int, np.ndarray] = {}
        calls = plan_calls(chunks, self.context)
        adapters = {c.lora_id for c in chunks if c.lora_id}
        if adapters and self.adapters is None:
            raise ValueError("a chunk names an adapter, but LoRA is not enabled")
        # An adapter loading from another thread waits for the step's end.
        with self.adapters.lock if adapters else nullcontext():  # type: ignore[union-attr]
            stack_rows = self.adapters.ensure(adapters) if adapters else {}  # type: ignore[union-attr]
            for call in calls:
                for chunk, rows in zip(call, self._call(call, stack_rows), strict=True):
                    # Each call reuses the logits buffer: a step of several keeps copies.
                    logits[id(chunk)] = rows if len(calls) == 1 else rows.copy()
        return [logits[id(chunk)] for chunk in chunks]

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> np.ndarray:
        """Whole prompts into slots first_slot, first_slot + 1, ... in one call; each
        prompt's last logits, [n, vocab]."""
        call = [Chunk(first_slot + row, prompt, 0) for row, prompt in enumerate(prompts)]
        return np.stack([rows[-1] for rows in self._call(call)])

    def decode(self, token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One new token for slots 0..n-1, each after its own `lengths[i]` cached tokens."""
        pairs = zip(token_ids, lengths, strict=True)
        call = [Chunk(slot, [int(t)], int(n)) for slot, (t, n) in enumerate(pairs)]
        return np.stack([rows[-1] for rows in self._call(call)])

    def _call(
        self, chunks: list[Chunk], stack_rows: dict[int, int] | None = None
    ) -> list[np.ndarray]:
        """One graph call binding slots first..last of `chunks` (a slot at most once; those
        between without a chunk sit it out): each chunk's logits. A call with an adapter's
        chunk runs the LoRA graph, `stack_rows` saying where each adapter is."""
        first_slot = min(c.slot for c in chunks)
        batch = max(c.slot for c in chunks) - first_slot + 1
        width = max(len(c.token_ids) for c in chunks)
        new_tokens = np.zeros(batch, dtype=np.int32)
        seqlens = np.zeros(batch, dtype=np.int32)  # a slot sitting out: 1 token, none new
        padded_from = np.zeros((batch, width), dtype=np.int64)
        packed_from, wanted, offset = [], [], 0
        for chunk in chunks:
            row, count = chunk.slot - first_slot, len(chunk.token_ids)
            new_tokens[row], seqlens[row] = count, chunk.start + count - 1
            padded_from[row, :count] = np.arange(offset, offset + count)
            packed_from.append(row * width + np.arange(count))
            # The logits of every position of a scored prompt, else of the last.
            wanted.append(
                np.arange(offset if chunk.every_position else offset + count - 1, offset + count)
            )
            offset += count
        inputs = {
            "input_ids": np.concatenate([np.asarray(c.token_ids, np.int64) for c in chunks]),
            "position_ids": np.concatenate(
                [np.arange(c.start, c.start + len(c.token_ids)) for c in chunks]
            ),
            "padded_from": padded_from,
            "packed_from": np.concatenate(packed_from),
            "seqlens_k": seqlens,
            "query_seqlens": new_tokens,
            "total_sequence_length": np.array(seqlens.max() + 1, dtype=np.int32),
            # One row of all the positions wanted: a scored prompt's many cost no
            # other chunk anything.
            "logits_index": np.concatenate(wanted)[None],
        }
        rows = None
        if groups := lora_groups(chunks):
            by_row = {(stack_rows or {})[lora_id]: tokens for lora_id, tokens in groups.items()}
            rows = range(min(by_row), max(by_row) + 1)
            inputs |= lora_inputs(by_row, rows)
        logits = self._run(first_slot, inputs, batch, rows)
        return np.split(logits[0], np.cumsum([len(w) for w in wanted])[:-1])

    def _run(
        self, first_slot: int, inputs: dict[str, np.ndarray], batch: int, lora_rows: range | None
    ) -> np.ndarray:
        """The logits at `logits_index`, [1, positions, vocab]: in the runner's buffer when
        they fit it (the next call overwrites them), else in a new array. With `lora_rows`,
        the LoRA graph reading those rows of the adapter stacks, in place."""
        binding = self.binding if lora_rows is None else self.lora_binding
        if lora_rows is not None:
            for name, array in self.adapters.arrays.items():  # type: ignore[union-attr]
                address = array.ctypes.data + lora_rows.start * array[0].nbytes
                shape = (len(lora_rows), *array.shape[1:])
                binding.bind_input(name, "cpu", 0, array.dtype, shape, address)
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        shape = (batch, *self.cache.shape[1:])
        for tensor in range(2 * self.layers):
            layer, kind = divmod(tensor, 2)
            name = ("key", "value")[kind]
            address = self.cache.address(tensor, first_slot)
            binding.bind_input(
                f"past_{name}.{layer}", self.device, 0, self.cache.dtype, shape, address
            )
            binding.bind_output(
                f"present_{name}.{layer}", self.device, 0, self.cache.dtype, shape, address
            )
        wanted = inputs["logits_index"].size
        logits = (
            self.logits[:wanted].reshape(1, wanted, self.vocab_size)
            if wanted <= len(self.logits)
            else np.empty((1, wanted, self.vocab_size), dtype=np.float32)
        )
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        session = self.session if lora_rows is None else self.lora_session
        session.run_with_iobinding(binding)  # type: ignore[union-attr]
        return logits


def lora_inputs(by_row: dict[int, list[int]], rows: range) -> dict[str, np.ndarray]:
    """The LoRA graph's step inputs (export.graph.with_lora) for these groups of packed
    tokens by stack row: one group per row of `rows` (a row of no adapter of the step gets
    padding only), each padded with its first token, or token 0, to the largest."""
    width = max(map(len, by_row.values()))
    groups = [by_row.get(row, []) for row in rows]
    places = [index * width + np.arange(len(g)) for index, g in enumerate(groups)]
    return {
        "lora_gather": np.array([g + (g or [0])[:1] * (width - len(g)) for g in groups], np.int64),
        "lora_tokens": np.concatenate(groups).astype(np.int64)[:, None],
        "lora_places": np.concatenate(places).astype(np.int64),
    }
