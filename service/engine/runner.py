"""How one step runs: an ONNX Runtime session over a preallocated KV cache, through IOBinding.

The cache holds one slot per running sequence, [slots, heads, max_seq, head_dim] per layer
for keys and values. Past and present are bound to the same memory, so a step writes only
the new positions; nothing is copied or reallocated between steps. The slot dimension is
outermost, so consecutive slots are one contiguous block: a prefill binds the run of slots
it fills, a decode step binds slots 0..n-1.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from artifacts import VARIANT_FILES, ModelConfig


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
    ) -> None:
        config = ModelConfig.read(model_dir)
        self.context = config.n_positions
        self.vocab_size = config.vocab_size
        self.layers = config.n_layer
        self.eos_token_id = config.eos_token_id
        heads = config.n_head
        self.slots = slots
        self.device = device
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(
            str(Path(model_dir) / VARIANT_FILES[variant]), options, providers=providers
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        if len(inputs["logits_index"].shape) != 2:
            raise ValueError(
                f"{model_dir} was exported by an older tailorgpt (logits at one position per "
                "row): export it again with 'tailorgpt export'"
            )
        cache_type = inputs["past_key.0"].type
        dtype = np.float16 if "float16" in cache_type else np.float32
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

    def release(self, slot: int) -> None:
        """A sequence has left `slot`: its cache pages go back to the system."""
        self.cache.release(slot)

    def fork(self, source: int, target: int, tokens: int) -> None:
        self.cache.copy(source, target, tokens)

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> np.ndarray:
        """Run whole prompts into slots first_slot, first_slot + 1, ...; each prompt's last
        logits, [n, vocab]. Prompts of different lengths are right-padded into one call, so
        the weights are read once for all of them."""
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape)
        last = np.array([[len(p) - 1] for p in prompts], dtype=np.int64)
        return self._run(first_slot, ids, positions, last[:, 0].astype(np.int32), width, last)[:, 0]

    def prefill_chunk(
        self, slot: int, chunk: list[int], start: int, every_position: bool = False
    ) -> np.ndarray:
        """Run part of a prompt, positions start.. of a slot whose cache holds the tokens
        before it (chunked prefill, or the rest of a cached prompt); the logits of its last
        position, [1, vocab], or with `every_position` of each, [len(chunk), vocab]."""
        ids = np.array([chunk], dtype=np.int64)
        positions = np.arange(start, start + len(chunk), dtype=np.int64)[None]
        end = start + len(chunk)
        wanted = np.arange(len(chunk) if every_position else 1, dtype=np.int64)
        wanted += 0 if every_position else len(chunk) - 1
        seqlens = np.array([end - 1], dtype=np.int32)
        return self._run(slot, ids, positions, seqlens, end, wanted[None])[0]

    def decode(self, token_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One new token for slots 0..n-1, each after its own `lengths[i]` cached tokens."""
        ids = np.asarray(token_ids, dtype=np.int64)[:, None]
        positions = np.asarray(lengths, dtype=np.int64)[:, None]
        seqlens = np.asarray(lengths, dtype=np.int32)  # total after the step, minus one
        last = np.zeros((len(ids), 1), dtype=np.int64)
        return self._run(0, ids, positions, seqlens, int(seqlens.max()) + 1, last)[:, 0]

    def _run(
        self,
        first_slot: int,
        ids: np.ndarray,
        positions: np.ndarray,
        seqlens: np.ndarray,
        total: int,
        wanted: np.ndarray,
    ) -> np.ndarray:
        """The logits at each row's `wanted` positions, [rows, positions, vocab]."""
        binding = self.binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        binding.bind_cpu_input("logits_index", wanted)
        rows = len(ids)
        shape = (rows, *self.cache.shape[1:])
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
        logits = (
            self.logits[:rows]
            if wanted.shape[1] == 1
            else np.empty((rows, wanted.shape[1], self.vocab_size), dtype=np.float32)
        )
        binding.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits
