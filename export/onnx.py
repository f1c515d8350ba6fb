"""Convert a trained run or a GPT-2 checkpoint to the serving graph, quantize it (onnxruntime)
and check parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from artifacts import (
    CONFIG,
    HELDOUT,
    HELDOUT_BLOCKS,
    MANIFEST,
    METRICS,
    PARITY,
    PARITY_SAMPLE,
    RUN_FILES,
    VARIANT_FILES,
    ModelConfig,
    UserError,
    atomic_dir,
    graph_name,
    lora_file,
    read_manifest,
    write_json,
    write_manifest,
)
from export.graph import INT8_SCHEME, build, check_supported, with_int8_kv_cache, with_lora
from export.sample_text import SAMPLE_DOCUMENTS
from service.engine import (
    DEFAULT_CHAT_TEMPLATE,
    ModelRunner,
    cpu_flags,
    decode_logits,
    nll,
    perplexity,
)
from training.data import pack_blocks
from training.model import (
    chat_template_option,
    load_base_config,
    load_base_model,
    load_tokenizer,
    weights_fingerprint,
)
from training.prepare import read_documents

TASK = "text-generation-shared-kv"
# A LoRA adapter moves keys and values past the base's range, and the cache is shared by base
# and adapter rows alike: one set of scales for both. With 3x the base's largest, the test
# model's adapters agreed with PyTorch's merged model 0.98 of the time (0.92-0.94 without),
# and the base's own int8-cache perplexity moved 0.005% (tests/test_lora.py, BENCHMARKS.md).
KV_SCALE_HEADROOM = 3.0
PARITY_TOKENS = 128  # per held-out block: enough to cover the cache, quick on GPT-2 sizes
SAMPLE_BLOCKS, SAMPLE_TOKENS = 2, 32  # what a server re-checks at start on another CPU
# What a Hugging Face GPT-2 directory must hold: any one of each group.
CHECKPOINT_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CHECKPOINT_TOKENIZERS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))
ACCEPTED = (
    "a training run (the --output_dir of 'tailorgpt train') or a Hugging Face GPT-2 directory "
    "(config.json; model.safetensors or pytorch_model.bin; tokenizer.json, vocab.json + "
    "merges.txt, or a BERT vocab.txt)"
)
BUILT_IN_SAMPLE = "built-in sample (English and Chinese)"


def save(model: onnx.ModelProto, work: Path, variant: str, kv_scales: np.ndarray | None) -> None:
    """The variant's graph with its weights in a side file (model.onnx_data: protobuf stops
    at 2 GB), with `kv_scales` its int8-cache graph, and each one's LoRA twin: all reference
    the same weights file."""
    path = work / VARIANT_FILES[variant]
    # Saving moves the weights out of `model`, leaving references: the copy is light.
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + "_data",
        size_threshold=1024,
    )
    # onnx creates it readable by its owner only; a container serves it as another user.
    path.with_name(path.name + "_data").chmod(0o644)
    graphs = {variant: model}
    if kv_scales is not None:
        graphs[graph_name(variant, "int8")] = with_int8_kv_cache(model, kv_scales)
    for name, graph in graphs.items():
        if graph is not model:
            onnx.save_model(graph, work / VARIANT_FILES[name])
        # Its LoRA twin, run only for steps that hold an adapter's rows.
        onnx.save_model(with_lora(graph), work / lora_file(VARIANT_FILES[name]))


def kv_cache_scales(model: PreTrainedModel, blocks: np.ndarray) -> np.ndarray:
    """Static scales of the int8 KV cache: per layer, keys then values, head and channel,
    KV_SCALE_HEADROOM times the largest magnitude seen on `blocks`, over 127, [layers, 2,
    heads, head_dim]."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    largest: list[torch.Tensor] = []
    hooks = [
        block.attn.c_attn.register_forward_hook(
            lambda _module, _inputs, qkv: largest.append(qkv.abs().amax((0, 1)))
        )
        for block in model.transformer.h
    ]
    with torch.no_grad():
        model(torch.from_numpy(blocks))
    for hook in hooks:
        hook.remove()
    keys_values = torch.stack(largest)[:, config.n_embd :]  # queries first: not cached
    shape = (config.n_layer, 2, config.n_head, head_dim)
    largest_seen = keys_values.reshape(shape).clamp_min(1e-6)
    return (largest_seen * KV_SCALE_HEADROOM / 127).numpy()


def run_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a training run, None for a GPT-2 checkpoint; anything else is a
    UserError naming what is missing and what is accepted."""
    if (directory / MANIFEST).is_file():
        return read_manifest(directory, "train")  # another stage's output: says which
    if problem := checkpoint_problem(directory):
        raise UserError(f"{directory}: {problem}: pass {ACCEPTED}")
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """What keeps `directory` from being a GPT-2 checkpoint, or None."""
    if not directory.is_dir():
        return "no such directory"
    if not (directory / CONFIG).is_file():
        return f"neither a training run (no {MANIFEST}) nor a model (no {CONFIG})"
    try:
        ModelConfig.read(directory)
    except UserError as err:
        return str(err).removeprefix(f"{directory / CONFIG}: ")
    if not any((directory / name).is_file() for name in CHECKPOINT_WEIGHTS):
        return "no weights"
    if not any(all((directory / n).is_file() for n in names) for names in CHECKPOINT_TOKENIZERS):
        return "no tokenizer"
    return None


def run_base_model(run_dir: Path) -> str:
    """The model the run was fine-tuned from, as its metrics name it."""
    return json.loads((run_dir / METRICS).read_text())["base_model"]


def load_run(run_dir: Path, work: Path) -> PreTrainedModel:
    """The run's model; the files serving needs copied into the export."""
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, work / name)
    return AutoModelForCausalLM.from_pretrained(run_dir)


def load_checkpoint(directory: Path, work: Path) -> PreTrainedModel:
    """The checkpoint's model, loaded as training loads a base model (the config's end token
    made the tokenizer's); its config and tokenizer written into the export, tokenizer.json
    included, which the server reads and many checkpoints lack."""
    config = load_base_config(str(directory))
    try:
        check_supported(config)
    except ValueError as err:  # before any weights load
        raise UserError(f"{directory}: {err}") from None
    model, tokenizer = load_base_model(str(directory), config)
    model.config.save_pretrained(work)
    model.generation_config.save_pretrained(work)
    tokenizer.save_pretrained(work)  # a fast tokenizer: writes tokenizer.json
    return model


def write_chat_template(work: Path, source: str | None) -> None:
    """The export's chat template, in its tokenizer_config.json where the server reads it:
    `source` when given, else the model's own (a checkpoint may keep it in
    chat_template.jinja), else the layout `tailorgpt prepare` gives chat records."""
    config_path, jinja = work / "tokenizer_config.json", work / "chat_template.jinja"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if source is None and jinja.is_file():
        source = jinja.read_text(encoding="utf-8")
    jinja.unlink(missing_ok=True)
    write_json(
        config_path,
        config | {"chat_template": source or config.get("chat_template") or DEFAULT_CHAT_TEMPLATE},
    )


def parity_documents(validation_file: Path | None, is_run: bool) -> tuple[list[str] | None, str]:
    """The documents parity is measured on (None: the run's held-out blocks), and their
    origin for parity.json."""
    if validation_file is not None:
        if not validation_file.exists():
            raise UserError(f"--validation_file {validation_file}: no such file: pass a text file")
        return read_documents([validation_file]), str(validation_file)
    if is_run:
        return None, HELDOUT
    return list(SAMPLE_DOCUMENTS), BUILT_IN_SAMPLE


def parity_blocks(source: Path, export_dir: Path, documents: list[str] | None) -> np.ndarray:
    """The run's held-out blocks, or `documents` packed into blocks as training packs them,
    with the export's own tokenizer."""
    if documents is None:
        return np.array(json.loads((source / HELDOUT).read_text())["input_ids"])[:, :PARITY_TOKENS]
    length = min(PARITY_TOKENS, ModelConfig.read(export_dir).n_positions)
    blocks = pack_blocks(documents, load_tokenizer(str(export_dir)), length)[:HELDOUT_BLOCKS]
    if not blocks:
        raise UserError(
            f"--validation_file: too little text for one block of {length} tokens: pass more"
        )
    return np.array(blocks)


def padded_prefill_diff(runner: ModelRunner, blocks: np.ndarray, reference: np.ndarray) -> float:
    """The blocks cut to different lengths and prefilled in one right-padded call, as the
    scheduler groups prompts: each row's last logits against PyTorch's at that position."""
    steps = reference.shape[1]
    lengths = [max(1, steps - 5 * row) for row in range(len(blocks))]
    prompts = [block[:n].tolist() for block, n in zip(blocks, lengths, strict=True)]
    logits = runner.prefill(0, prompts)
    expected = np.stack([reference[row, n - 1] for row, n in enumerate(lengths)])
    return float(np.abs(logits - expected).max())


def parity_report(
    model_dir: Path, export_dir: Path, variants: list[str], blocks: np.ndarray
) -> dict[str, Any]:
    """Each variant against PyTorch on `blocks`, decoded token by token through the cache.

    Every logit compared comes from the engine's own decode path (KV cache, IOBinding), so
    the check covers what serving runs, not just the graph. The CPU's flags are recorded (int8
    kernels depend on them), and the first blocks' losses go to PARITY_SAMPLE so that a server
    on another CPU can re-check them (service.engine.numerics.recheck).
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        reference = model(torch.from_numpy(blocks)).logits.float().numpy()[:, :-1]
    tokens = blocks.size - len(blocks)  # the last token of a block has nothing to predict
    sample = blocks[:SAMPLE_BLOCKS, : SAMPLE_TOKENS + 1]
    report: dict[str, Any] = {"heldout_tokens": tokens, "cpu_flags": cpu_flags()}
    report["pytorch"] = {"perplexity": perplexity(nll(reference, blocks), tokens)}
    sample_nll = {}
    for variant in variants:
        weights, _, kv_cache_dtype = variant.partition("_kv_")
        runner = ModelRunner(
            export_dir, weights, len(blocks), kv_cache_dtype=kv_cache_dtype or "fp32"
        )
        logits = decode_logits(runner, blocks)
        report[variant] = {
            "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "padded_prefill_max_abs_logit_diff": padded_prefill_diff(runner, blocks, reference),
            "perplexity": perplexity(nll(logits, blocks), tokens),
            "greedy_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        }
        sample_nll[variant] = nll(logits[:SAMPLE_BLOCKS, :SAMPLE_TOKENS], sample)
    if "int8" in report:
        report["int8"]["scheme"] = INT8_SCHEME
    write_json(export_dir / PARITY_SAMPLE, {"input_ids": sample.tolist(), "nll": sample_nll})
    return report


def export(
    source: Path,
    output: Path,
    fp16: bool = False,
    validation_file: Path | None = None,
    chat_template: Path | None = None,
) -> dict[str, Any]:
    """Write EXPORT_DIR from a training run or a GPT-2 checkpoint: model.onnx, model_int8.onnx
    (and model_fp16.onnx for GPUs), the tokenizer and config with its chat template,
    parity.json."""
    source = Path(source)
    template = chat_template_option(chat_template)
    manifest = run_manifest(source)
    documents, parity_text = parity_documents(validation_file, manifest is not None)
    variants = ["fp32", "int8", "fp32_kv_int8", "int8_kv_int8"] + (["fp16"] if fp16 else [])
    with atomic_dir(output) as work:
        model = (load_run(source, work) if manifest else load_checkpoint(source, work)).eval()
        write_chat_template(work, template)
        fingerprint = weights_fingerprint(model)  # the adapters trained on it name it
        blocks = parity_blocks(source, work, documents)
        # Calibrated on half the parity blocks, so that parity also sees text it was not.
        scales = kv_cache_scales(model, blocks[::2])
        save(build(model), work, "fp32", scales)
        save(build(model, int8=True), work, "int8", scales)
        if fp16:  # for CUDA, whose GroupQueryAttention takes half precision only
            save(build(model, "float16"), work, "fp16", None)
        del model
        parity = {"parity_text": parity_text, **parity_report(source, work, variants, blocks)}
        write_json(work / PARITY, parity)
        files = {v: VARIANT_FILES[v] for v in variants}
        sizes = {v: (work / f).stat().st_size for v, f in files.items()}
        weights = {v: work / (files[v.partition("_kv_")[0]] + "_data") for v in variants}
        sizes = {v: size + weights[v].stat().st_size for v, size in sizes.items()}
        write_manifest(
            work,
            "export",
            {"run_dir" if manifest else "model_dir": str(source)},
            task=TASK,
            variants=files,
            size_bytes=sizes,
            base_model=run_base_model(source) if manifest else str(source.resolve()),
            weights_fingerprint=fingerprint,
        )
    return parity
