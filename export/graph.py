"""GPT-2 as an ONNX graph built for serving: fused attention over a shared, preallocated KV cache.

Written by hand because no exporter makes this graph for GPT-2: optimum's graph (and the ORT
transformers optimizer on top of it) concatenates past and new keys into a fresh tensor every
step, with one past length for the whole batch. Here each attention is onnxruntime's
GroupQueryAttention with past and present bound to the same buffer, [slots, heads, max_seq,
head_dim]: every row appends its new keys in place at its own length (`seqlens_k`), so
sequences of different lengths share a batch and join or leave it without copying the cache.

Tokens are packed: a step's new tokens, all rows together, are one [tokens] axis, so the
matrix products run on real tokens only, and a step can mix rows that decode one token with
rows that prefill a prompt chunk (mixed steps, as vLLM's and TGI's flattened batches). Only
the attention sees rows: it gathers the tokens into a right-padded [batch, seq] layout, one
row per cache slot bound, and `query_seqlens` says how many of each row's are real (0: the
slot sits this step out and nothing of it is read or written).

Inputs:  input_ids, position_ids [tokens] int64; padded_from [batch, seq] int64 (the packed
         token at each padded place; padding may name any token); packed_from [tokens] int64
         (each token's place in the flattened [batch * seq] layout); seqlens_k [batch] int32
         (each row's length after this step, minus one); query_seqlens [batch] int32 (its new
         tokens); total_sequence_length [] int32 (an upper bound of the lengths);
         logits_index [rows, positions] int64 (the packed tokens whose logits are wanted:
         each chunk's last one, or all of a prompt's when a client asks for its
         log-probabilities); past_key.N / past_value.N [batch, heads, max_seq, head_dim].
Outputs: logits [rows, positions, vocab] float32 at logits_index only (a prefill never pays
         the vocabulary projection for the whole prompt); present_key.N / present_value.N.

In int8, the token embedding is stored once: the output projection's 7-bit weights are the
embedding's rows (GPT-2 ties them), so the input side gathers its columns and scales them,
and GPT-2 124M's file is 127 MB rather than 282 MB with an fp32 copy of the embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from artifacts import LORA_PROJECTIONS

# int8 weights keep 7 bits: on CPUs without VNNI, onnxruntime sums pairs of u8 x s8 products
# in int16 (vpmaddubsw), and 255 * 63 * 2 = 32,130 is the largest pair that never saturates.
# Full 8-bit weights moved GPT-2 124M's logits by up to 0.3 there (BENCHMARKS.md, "Which int8
# scheme"); with 7 bits every x86 CPU computes the same int32 sums.
INT8_WEIGHT_LEVELS = 63
INT8_SCHEME = "int8 activations per row x 7-bit weights per column (saturation-free)"
OPSET = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
# The inputs of a step besides the cache (module docstring); int64 unless named here.
STEP_INPUTS = {
    "input_ids": ["tokens"],
    "position_ids": ["tokens"],
    "padded_from": ["batch", "seq"],
    "packed_from": ["tokens"],
    "seqlens_k": ["batch"],
    "query_seqlens": ["batch"],
    "total_sequence_length": [],
    "logits_index": ["rows", "positions"],
}
INT32_INPUTS = ("seqlens_k", "query_seqlens", "total_sequence_length")
DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def check_supported(config: Any) -> None:
    unsupported = {
        "scale_attn_by_inverse_layer_idx": True,
        "reorder_and_upcast_attn": True,
        "scale_attn_weights": False,
    }
    for name, value in unsupported.items():
        if getattr(config, name, not value) == value:
            raise ValueError(f"GPT-2 option {name}={value} is not supported by the serving graph")
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {config.activation_function!r} is not supported")


class _Builder:
    def __init__(self, dtype: str, int8: bool, weight_levels: int) -> None:
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.int8 = int8
        self.weight_levels = weight_levels
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants: set[str] = set()

    def weight(self, name: str, tensor: Any, dtype: Any = None) -> str:
        array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
        self.initializers.append(
            numpy_helper.from_array(array.astype(dtype or self.np_dtype), name)
        )
        return name

    def constant(self, name: str, value: Any, dtype: Any) -> str:
        if name not in self.constants:  # shared by every layer, stored once
            self.constants.add(name)
            self.weight(name, np.array(value), dtype)
        return name

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, domain=domain, **attrs))
        return name

    def linear(self, x: str, prefix: str, weight: Any, bias: Any) -> str:
        """x @ weight + bias; weight is [in, out] (GPT-2's Conv1D layout), or an int8 weight
        already stored (int8_weight's pair)."""
        weight = weight.detach().cpu().numpy() if hasattr(weight, "detach") else weight
        if self.int8:
            product = self.int8_matmul(x, prefix, weight)
        else:
            product = self.node(
                "MatMul", [x, self.weight(prefix + ".weight", weight)], prefix + "/matmul"
            )
        if bias is None:
            return product
        return self.node("Add", [product, self.weight(prefix + ".bias", bias)], prefix + "/out")

    def int8_weight(self, prefix: str, weight: np.ndarray) -> tuple[str, str]:
        """`weight` [in, out] as int8 per output column: (int8 weight, column scales)."""
        levels = self.weight_levels
        column_scale = np.maximum(np.abs(weight).max(0), 1e-12) / levels
        quantized = np.clip(np.round(weight / column_scale), -levels, levels)
        return (
            self.weight(prefix + ".weight_int8", quantized, np.int8),
            self.weight(prefix + ".column_scale", column_scale, np.float32),
        )

    def int8_matmul(self, x: str, prefix: str, weight: np.ndarray | tuple[str, str]) -> str:
        """int8 x int8 with int32 sums: weights per output column (INT8_WEIGHT_LEVELS),
        activations per row (per token), both symmetric, as CTranslate2's int8 does.

        Built by hand because onnxruntime's quantizers scale activations per tensor (the
        whole batch shares one scale, so a request's output depends on its batch mates) or
        blockwise (MatMulNBits, which does not use the CPU's int8 matrix units and measured
        2x slower at batch 32; BENCHMARKS.md). A row's result here depends on that row only.
        """
        weight_int8, column_scale = (
            weight if isinstance(weight, tuple) else self.int8_weight(prefix, weight)
        )
        last_axis = self.constant("int8.last_axis", [-1], np.int64)
        magnitude = self.node(
            "ReduceMax", [self.node("Abs", [x], prefix + "/abs"), last_axis], prefix + "/amax"
        )
        floor = self.constant("int8.floor", 1e-12, np.float32)
        levels = self.constant("int8.levels", 127.0, np.float32)
        row_scale = self.node(
            "Div",
            [self.node("Max", [magnitude, floor], prefix + "/amax_floor"), levels],
            prefix + "/row_scale",
        )
        rounded = self.node(
            "Round", [self.node("Div", [x, row_scale], prefix + "/scaled")], prefix + "/round"
        )
        # uint8 with zero point 128: the u8 x s8 product the CPU's int8 instructions take.
        shifted = self.node(
            "Add", [rounded, self.constant("int8.shift", 128.0, np.float32)], prefix + "/shift"
        )
        x_int8 = self.node("Cast", [shifted], prefix + "/x_uint8", to=TensorProto.UINT8)
        product = self.node(
            "MatMulIntegerToFloat",
            [
                x_int8,
                weight_int8,
                self.constant("int8.one", 1.0, np.float32),
                column_scale,
                self.constant("int8.zero_point", 128, np.uint8),
            ],
            prefix + "/column_scaled",
            domain="com.microsoft",
        )
        return self.node("Mul", [product, row_scale], prefix + "/matmul")

    def layer_norm(self, x: str, prefix: str, norm: Any, eps: float) -> str:
        scale, bias = (
            self.weight(prefix + ".weight", norm.weight),
            self.weight(prefix + ".bias", norm.bias),
        )
        return self.node(
            "LayerNormalization", [x, scale, bias], prefix + "/out", axis=-1, epsilon=eps
        )


def build(
    model: Any,
    dtype: str = "float32",
    int8: bool = False,
    weight_levels: int = INT8_WEIGHT_LEVELS,
) -> onnx.ModelProto:
    """The serving graph of a transformers GPT2LMHeadModel, weights included; with int8,
    every matrix product (the output projection too) in int8."""
    config = model.config
    check_supported(config)
    heads, width = config.n_head, config.n_embd
    head_dim = width // heads
    b = _Builder(dtype, int8, weight_levels)
    transformer = model.transformer

    if int8:
        vocab = b.int8_weight("lm_head", model.lm_head.weight.detach().cpu().numpy().T)
        tokens = int8_embedding(b, vocab)
        output_weight: Any = vocab
    else:
        tokens = b.node(
            "Gather", [b.weight("wte", transformer.wte.weight), "input_ids"], "embed/tokens"
        )
        output_weight = model.lm_head.weight.detach().cpu().numpy().T
    positions = b.node(
        "Gather", [b.weight("wpe", transformer.wpe.weight), "position_ids"], "embed/positions"
    )
    hidden = b.node("Add", [tokens, positions], "embed/out")
    cache_shape = ["batch", heads, "max_seq", head_dim]
    inputs = [
        helper.make_tensor_value_info(
            name, TensorProto.INT32 if name in INT32_INPUTS else TensorProto.INT64, shape
        )
        for name, shape in STEP_INPUTS.items()
    ]
    flat_width = b.constant("flat_width", [-1, width], np.int64)
    outputs = []
    for i, block in enumerate(transformer.h):
        p = f"h.{i}"
        normed = b.layer_norm(hidden, p + ".ln_1", block.ln_1, config.layer_norm_epsilon)
        attn = block.attn
        qkv = b.linear(normed, p + ".attn.c_attn", attn.c_attn.weight, attn.c_attn.bias)
        padded = b.node("Gather", [qkv, "padded_from"], p + ".attn/padded")
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_{kind}.{i}", b.onnx_dtype, cache_shape)
            )
            outputs.append(
                helper.make_tensor_value_info(f"present_{kind}.{i}", b.onnx_dtype, cache_shape)
            )
        b.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    padded,
                    "",
                    "",
                    f"past_key.{i}",
                    f"past_value.{i}",
                    "seqlens_k",
                    "total_sequence_length",
                    *[""] * 9,  # cos/sin caches ... k_norm_weight: unused
                    "query_seqlens",
                ],
                [p + ".attn/rows", f"present_key.{i}", f"present_value.{i}"],
                name=p + ".attn",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=heads,
            )
        )
        flat = b.node("Reshape", [p + ".attn/rows", flat_width], p + ".attn/flat")
        b.node("Gather", [flat, "packed_from"], p + ".attn/out")
        attended = b.linear(
            p + ".attn/out", p + ".attn.c_proj", block.attn.c_proj.weight, block.attn.c_proj.bias
        )
        hidden = b.node("Add", [hidden, attended], p + "/attn_residual")
        normed = b.layer_norm(hidden, p + ".ln_2", block.ln_2, config.layer_norm_epsilon)
        up = b.linear(normed, p + ".mlp.c_fc", block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        activated = b.node("FastGelu", [up], p + ".mlp/gelu", domain="com.microsoft")
        down = b.linear(
            activated, p + ".mlp.c_proj", block.mlp.c_proj.weight, block.mlp.c_proj.bias
        )
        hidden = b.node("Add", [hidden, down], p + "/mlp_residual")

    wanted = b.node("Gather", [hidden, "logits_index"], "wanted")
    normed = b.layer_norm(wanted, "ln_f", transformer.ln_f, config.layer_norm_epsilon)
    logits = b.linear(normed, "lm_head", output_weight, None)
    if dtype == "float32":
        b.node("Identity", [logits], "logits")
    else:  # logits leave the graph as float32 whatever the weights
        b.node("Cast", [logits], "logits", to=TensorProto.FLOAT)
    outputs.insert(
        0,
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["rows", "positions", config.vocab_size]
        ),
    )

    graph = helper.make_graph(b.nodes, "tailorgpt-gpt2", inputs, outputs, b.initializers)
    return helper.make_model(graph, opset_imports=OPSET, producer_name="tailorgpt")


def int8_embedding(b: _Builder, vocab: tuple[str, str]) -> str:
    """The input embedding from the output projection's int8 weights [width, vocab]: each
    token's column, cast and scaled back, [tokens, width]."""
    weight_int8, column_scale = vocab
    columns = b.node("Gather", [weight_int8, "input_ids"], "embed/columns", axis=1)
    rows = b.node("Transpose", [columns], "embed/rows", perm=[1, 0])
    as_float = b.node("Cast", [rows], "embed/float", to=b.onnx_dtype)
    scales = b.node("Gather", [column_scale, "input_ids"], "embed/scales")
    scales = b.node("Unsqueeze", [scales, b.constant("axis_last", [-1], np.int64)], "embed/s")
    return b.node("Mul", [as_float, scales], "embed/tokens")


def with_int8_kv_cache(model: onnx.ModelProto, scales: np.ndarray) -> onnx.ModelProto:
    """A copy of the serving graph that keeps keys and values in int8: onnxruntime's
    GroupQueryAttention quantizes what it appends and dequantizes what it reads, with one
    static symmetric scale per head and channel (`scales` [layers, 2, heads, head_dim],
    keys then values, calibrated at export). A quarter of the fp32 cache's bytes a token,
    so a pod holds four times the tokens and a long context's decode reads a quarter.

    Cheap when `model`'s weights are already external: the copy holds their references."""
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    graph = quantized.graph
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    for layer, node in enumerate(attention):
        for kind, index in (("key", 12), ("value", 13)):
            name = f"kv_scale.{kind}.{layer}"
            scale = scales[layer, ("key", "value").index(kind)][:, None, :]
            graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), name))
            node.input[index] = name
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_", "present_")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    return quantized


# The inputs a LoRA step adds (module docstring of with_lora); int64.
LORA_STEP_INPUTS = {
    "lora_gather": ["adapters", "group"],
    "lora_tokens": ["lora_tokens", 1],
    "lora_places": ["lora_tokens"],
}


def with_lora(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the serving graph that adds each token's LoRA update to every projection:
    x @ A @ B (B scaled by alpha / r when loaded), A and B the token's adapter's.

    The server keeps every loaded adapter in stacks, one pair per projection, [stack, in,
    rank] and [stack, rank, out], and binds a step's run of neighbouring rows, first to last
    of its adapters, as lora_a.<layer>.<projection> [adapters, in, rank] and lora_b...
    [adapters, rank, out]: no copy of the weights. The step's tokens are grouped by adapter
    (as Punica's and S-LoRA's segmented kernels group them), so each adapter's A and B are
    read once however many of its tokens the step holds:

      lora_gather [adapters, group]: each row's packed tokens, right-padded (any token; a
                                     row of no adapter of the step has padding only)
      lora_tokens [lora_tokens, 1]: the packed tokens that have an adapter
      lora_places [lora_tokens]: each one's place in the flattened [adapters * group] layout

    Rows of the base model (no adapter) are simply not in a group: a step mixes them freely.
    Cheap when `model`'s weights are external: the copy holds their references."""
    lora = onnx.ModelProto()
    lora.CopyFrom(model)
    graph = lora.graph
    dtype = next(i for i in graph.input if i.name == "past_key.0").type.tensor_type.elem_type
    dtype = TensorProto.FLOAT16 if dtype == TensorProto.FLOAT16 else TensorProto.FLOAT
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    graph.input.extend(
        helper.make_tensor_value_info(name, TensorProto.INT64, shape)
        for name, shape in LORA_STEP_INPUTS.items()
    )
    nodes = list(graph.node)
    layers = sum(node.op_type == "GroupQueryAttention" for node in nodes)
    updates: dict[str, list[onnx.NodeProto]] = {}  # after each projection's output node
    for layer in range(layers):
        for projection in LORA_PROJECTIONS:
            prefix = f"h.{layer}.{projection}"
            # The projection's first node reads its input (MatMul, or int8's Abs).
            x = next(n for n in nodes if n.name.startswith(prefix + "/")).input[0]
            fan_in, fan_out = shapes.get(prefix + ".weight") or shapes[prefix + ".weight_int8"]
            a, b = f"lora_a.{layer}.{projection}", f"lora_b.{layer}.{projection}"
            graph.input.extend(
                [
                    helper.make_tensor_value_info(a, dtype, ["stack", fan_in, "rank"]),
                    helper.make_tensor_value_info(b, dtype, ["stack", "rank", fan_out]),
                ]
            )
            rows = f"lora.rows.{fan_out}"
            if rows not in shapes:  # shared by the projections of this width
                shapes[rows] = [2]
                graph.initializer.append(
                    numpy_helper.from_array(np.array([-1, fan_out], np.int64), rows)
                )
            output = next(n for n in nodes if n.name == prefix + "/out")
            output.output[0] = prefix + "/base"  # the update's sum takes its name
            updates[output.name] = lora_update(f"lora.{layer}.{projection}", x, a, b, rows, prefix)
    del graph.node[:]
    for node in nodes:
        graph.node.append(node)
        graph.node.extend(updates.get(node.name, []))
    return lora


def lora_update(name: str, x: str, a: str, b: str, rows: str, prefix: str) -> list[onnx.NodeProto]:
    """The projection `prefix`'s output: its base output plus each adapter token's x @ A @ B
    (with_lora)."""

    def node(op: str, inputs: list[str], suffix: str) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{name}/{suffix}"], name=f"{name}/{suffix}")

    return [
        node("Gather", [x, "lora_gather"], "x"),  # [adapters, group, in]
        node("MatMul", [f"{name}/x", a], "down"),
        node("MatMul", [f"{name}/down", b], "up"),  # [adapters, group, out]
        node("Reshape", [f"{name}/up", rows], "rows"),
        node("Gather", [f"{name}/rows", "lora_places"], "tokens"),
        helper.make_node(
            "ScatterND",
            [prefix + "/base", "lora_tokens", f"{name}/tokens"],
            [prefix + "/out"],
            name=f"{name}/add",
            reduction="add",
        ),
    ]
