"""The `tailorgpt` command line: one subcommand per stage, plus quickstart for all of them."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from tailorgpt.artifacts import UserError

DEFAULT_PORT = 3000
QUICKSTART_MARKER = "quickstart.json"
# GenerationRequest's fields, as on the API; it checks them and fills in its defaults.
SAMPLING_OPTIONS = {
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "repetition_penalty": float,
    "seed": int,
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    # Names follow transformers' run_clm.py; aliases keep its spelling working too. Every
    # default is SUPPRESS, so the namespace holds only the flags given, which then override
    # --config and the TrainArgs defaults.
    from tailorgpt.config import converter
    from training.train import TrainArgs

    parser.argument_default = argparse.SUPPRESS
    parser.add_argument("--config", type=Path, help="a YAML file of these options")
    parser.add_argument(
        "--data",
        "--train_file",
        type=Path,
        help="a 'tailorgpt prepare' output, or UTF-8 .txt/.md/.jsonl/.csv files",
    )
    parser.add_argument(
        "--base-model",
        "--model_name_or_path",
        dest="base_model",
        help="'tiny', a hub id (gpt2, distilgpt2, ...) or a dir",
    )
    parser.add_argument("--output", "--output_dir", dest="output", type=Path)
    switches = {
        "lora": "train LoRA adapters (merged into the weights at the end) instead of all weights",
        "resume_from_checkpoint": "continue from the latest checkpoint of an interrupted run",
    }
    for field in fields(TrainArgs):
        if field.name in switches:
            parser.add_argument(f"--{field.name}", action="store_true", help=switches[field.name])
        elif field.name not in ("data", "base_model", "output"):
            kind = converter(str(field.type))
            parser.add_argument(f"--{field.name}", type=kind, help=f"default: {field.default}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from training.prepare import PrepareArgs, format_table, prepare

    prepare_args = PrepareArgs(**{f.name: getattr(args, f.name) for f in fields(PrepareArgs)})
    print(format_table(prepare(prepare_args)))
    print(f"prepared {args.output}: train with 'tailorgpt train --data {args.output} ...'")


def cmd_train(args: argparse.Namespace) -> None:
    from tailorgpt.config import load_config, merge_options
    from training.train import TrainArgs, train

    flags = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainArgs)}}
    config = load_config(args.config, TrainArgs) if "config" in args else {}
    train_args = merge_options(TrainArgs, config, flags)
    metrics = train(train_args)
    if not metrics:
        return  # a torchrun worker other than the main process: it writes nothing
    run, tailorgpt = train_args.output, tailorgpt_command()
    name = store_name(run)
    print(training_summary(metrics, run))
    print(f"talk to it:         {tailorgpt} chat {run}")
    print(
        f"serve it over HTTP: {tailorgpt} export {run} --output {run}-export --name {name}\n"
        f"                    then {tailorgpt} serve --model tailorgpt-{name}:latest"
    )


def training_summary(metrics: dict[str, Any], run: Path) -> str:
    """What a run achieved and where to look; the end of `train` and of `quickstart`."""
    from training.callbacks import TRAINER_LOG

    before, after = metrics["validation_before"], metrics["validation_after"]
    stopped = metrics["stopped_early_at"]
    steps = f"stopped early at step {stopped}" if stopped else f"{metrics['optimizer_steps']} steps"
    return (
        f"trained {run} in {metrics['train_seconds']:.0f}s, {steps}: validation perplexity "
        f"{before['perplexity']:.1f} -> {after['perplexity']:.1f} (best at step "
        f"{metrics['best_step']})\n"
        f"loss curve: {run / 'loss_curve.png'}; samples: {run / 'samples'}; "
        f"trainer log: {run / TRAINER_LOG}"
    )


def store_name(run: Path) -> str:
    """A BentoML store name made from the run directory's, to suggest for export."""
    return re.sub(r"[^a-z0-9_.-]+", "-", run.name.lower()).strip("-_.") or "my-model"


def tailorgpt_command() -> str:
    """How to run tailorgpt again from this shell: `make demo` calls .venv/bin/tailorgpt,
    which is not on PATH unless the venv is activated."""
    script = Path(sys.argv[0])
    on_path = shutil.which("tailorgpt")
    if script.name == "tailorgpt" and (on_path is None or Path(on_path) != script.absolute()):
        return str(script)
    return "tailorgpt"


def cmd_plan(args: argparse.Namespace) -> None:
    from training.plan import (
        base_config,
        check_fits,
        compare_modes,
        describe,
        describe_speed,
        make_plan,
        plan_all,
    )
    from training.train import resolve_block_size

    if args.train_tokens and not args.measure:
        raise UserError("--train_tokens: add --measure, the time per epoch is measured")
    batch, lora_r = args.per_device_train_batch_size, args.lora_r
    if args.all:
        block_size = resolve_block_size(args.block_size, base_config("gpt2"))
        print(plan_all(block_size, batch, lora_r, args.measure, args.train_tokens))
        return
    config = base_config(args.base_model)
    block_size = resolve_block_size(args.block_size, config)
    plan = make_plan(config, block_size, batch, args.lora, lora_r=lora_r)
    print(describe(plan, block_size))
    print(compare_modes(config, block_size, batch, lora_r))
    if args.measure:
        print(describe_speed(config, plan, block_size, args.train_tokens))
    check_fits(plan, block_size)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate

    print(json.dumps(evaluate(args.run_dir, args.data, args.block_size), indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from export.onnx import export
    from export.store import check_name, import_to_store

    if args.name:
        check_name(args.name)  # before the export, which takes a while
    parity = export(args.source, args.output, args.fp16, args.validation_file)
    print(
        f"exported {args.output}: int8 greedy agreement "
        f"{parity['int8']['greedy_agreement']:.3f}, fp32 max |logit diff| "
        f"{parity['fp32']['max_abs_logit_diff']:.2e}"
    )
    if args.name:
        print(f"imported into the BentoML model store as {import_to_store(args.output, args.name)}")


def serve(model: str, port: int, variant: str, device: str = "cpu") -> None:
    """Run `bentoml serve` on the service in the foreground."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.models.get(model)
    except NotFound:
        raise UserError(
            f"model {model} is not in the BentoML store: run 'tailorgpt export RUN_DIR "
            "--output EXPORT_DIR --name NAME' first, or pick one from 'bentoml models list'"
        ) from None
    env = {
        **os.environ,
        "TAILORGPT_MODEL": model,
        "TAILORGPT_VARIANT": variant,
        "TAILORGPT_DEVICE": device,
    }
    print(
        f"serving {model} ({variant}) on http://127.0.0.1:{port}; try:\n"
        f"  curl -s -X POST http://127.0.0.1:{port}/generate -H 'Content-Type: "
        'application/json\' -d \'{"requests": [{"prompt": "Hello", '
        '"max_new_tokens": 32}]}\'\n'
        f"  curl -sN http://127.0.0.1:{port}/v1/completions -H 'Content-Type: "
        'application/json\' -d \'{"prompt": "Hello", "max_tokens": 32, "stream": true}\'\n'
        f"  or any OpenAI client: base_url http://127.0.0.1:{port}/v1, model "
        f"{model.split(':')[0]}",
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service.service:TailorGPT",
        "--port",
        str(port),
        "--working-dir",
        str(Path(__file__).resolve().parent.parent),
    ]
    raise SystemExit(subprocess.call(command, env=env))


def cmd_serve(args: argparse.Namespace) -> None:
    serve(args.model, args.port, args.variant, args.device)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, the variant and the API's sampling options; unset options keep its defaults."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="an export dir, a training run dir, or a store tag tailorgpt-NAME[:version]",
    )
    parser.add_argument("--variant", choices=["int8", "fp32"], default="int8")
    for name, kind in SAMPLING_OPTIONS.items():
        parser.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS)
    parser.add_argument(
        "--stop",
        action="append",
        default=argparse.SUPPRESS,
        help="a string that ends the output; repeat for more",
    )


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in [*SAMPLING_OPTIONS, "stop"] if name in args}


def cmd_generate(args: argparse.Namespace) -> None:
    from tailorgpt.chat import generate

    generate(args.model, args.prompt, args.variant, sampling_options(args))


def cmd_chat(args: argparse.Namespace) -> None:
    from tailorgpt.chat import chat

    chat(args.model, args.variant, sampling_options(args), args.system)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from export.onnx import export
    from export.store import MODEL_PREFIX, check_name, import_to_store
    from training.train import TrainArgs, train

    check_name(args.name)
    workspace: Path = args.output
    if workspace.exists():
        if not (workspace / QUICKSTART_MARKER).is_file():
            raise UserError(
                f"{workspace} exists and is not a quickstart workspace: choose another --output"
            )
        shutil.rmtree(workspace)  # quickstart owns this folder and rebuilds it each time
    workspace.mkdir(parents=True)
    (workspace / QUICKSTART_MARKER).write_text(json.dumps({"data": str(args.data)}) + "\n")
    print(f"[1/3] training the tiny preset on {args.data}", flush=True)
    metrics = train(
        TrainArgs(
            data=args.data,
            base_model="tiny",
            output=workspace / "run",
            block_size=64,
            num_train_epochs=args.num_train_epochs,
        )
    )
    print(f"[2/3] exporting to ONNX (fp32 + int8) in {workspace / 'export'}", flush=True)
    parity = export(workspace / "run", workspace / "export")
    tag = import_to_store(workspace / "export", args.name)
    print(f"[3/3] imported {tag}")
    summary = {"tag": tag, "training": metrics, "parity": parity}
    (workspace / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(training_summary(metrics, workspace / "run"))
    print(f"summary in {workspace / 'summary.json'}")
    model = f"{MODEL_PREFIX}{args.name}"
    print(f"talk to it in a terminal, no server needed: {tailorgpt_command()} chat {model}")
    if args.no_serve:
        print(f"serve it over HTTP: {tailorgpt_command()} serve --model {model}:latest")
    else:
        serve(f"{model}:latest", args.port, "int8")


def positive_int(text: str) -> int:
    """A count of at least 1; 1e6 and 1_000_000 are accepted too."""
    try:
        value = float(text)
    except ValueError:
        value = 0
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    from training.plan import LORA_RANK

    parser = argparse.ArgumentParser(prog="tailorgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare", help="clean, dedup and split your files into a dataset")
    prepare.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help=".txt .md .html .json .jsonl .csv files or folders (any encoding)",
    )
    prepare.add_argument("--output", type=Path, required=True)
    prepare.add_argument(
        "--text-field",
        dest="text_field",
        default="text",
        help="JSON field holding the text (chat records with 'messages' work too)",
    )
    prepare.add_argument(
        "--text-column", dest="text_column", default="text", help="CSV column holding the text"
    )
    prepare.add_argument("--min-chars", dest="min_chars", type=int, default=16)
    prepare.add_argument("--max-chars", dest="max_chars", type=int, default=200_000)
    prepare.add_argument(
        "--near-duplicate-threshold",
        dest="near_duplicate_threshold",
        type=float,
        default=0.85,
        help="MinHash Jaccard; 1 turns it off",
    )
    prepare.add_argument(
        "--scrub-pii",
        dest="scrub_pii",
        action="store_true",
        help="replace e-mails, phone and ID numbers, IPs with placeholders",
    )
    prepare.add_argument("--validation_split_percentage", type=float, default=10.0)
    prepare.add_argument("--seed", type=int, default=42)
    prepare.add_argument("--tokenizer", help="report tokens per character for this tokenizer")
    prepare.set_defaults(func=cmd_prepare)

    train = sub.add_parser("train", help="fine-tune a GPT-2 on your text")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="hardware, memory needed, and settings that fit")
    which = plan.add_mutually_exclusive_group(required=True)
    which.add_argument("--base-model", "--model_name_or_path", dest="base_model")
    which.add_argument("--all", action="store_true", help="a table of every built-in size")
    plan.add_argument("--block_size", type=int, default=None)
    plan.add_argument(
        "--per_device_train_batch_size",
        type=positive_int,
        default=8,
        help="the batch you want; the plan lowers it and accumulates to fit",
    )
    plan.add_argument("--lora", action="store_true", help="plan for LoRA instead of full")
    plan.add_argument("--lora_r", type=positive_int, default=LORA_RANK, help="LoRA rank")
    plan.add_argument(
        "--measure", action="store_true", help="time a few real training steps (random weights)"
    )
    plan.add_argument(
        "--train_tokens", type=positive_int, help="with --measure: time an epoch of this many"
    )
    plan.set_defaults(func=cmd_plan)

    evaluate = sub.add_parser("evaluate", help="perplexity of a trained run on some text")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--block_size", type=int, default=None)
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser("export", help="ONNX fp32 + int8, parity, BentoML store import")
    export.add_argument(
        "source",
        metavar="DIR",
        type=Path,
        help="a training run, or any Hugging Face GPT-2 directory (save_pretrained)",
    )
    export.add_argument("--output", type=Path, required=True)
    export.add_argument("--name", help="import as tailorgpt-NAME into the BentoML store")
    export.add_argument(
        "--fp16", action="store_true", help="also write model_fp16.onnx, for serving on a CUDA GPU"
    )
    export.add_argument(
        "--validation_file",
        type=Path,
        help="text to measure parity on (default: a run's held-out blocks, else a built-in sample)",
    )
    export.set_defaults(func=cmd_export)

    serve_ = sub.add_parser("serve", help="serve a stored model with bentoml serve")
    serve_.add_argument("--model", default="tailorgpt-demo:latest", help="BentoML store tag")
    serve_.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)))
    serve_.add_argument("--variant", choices=["int8", "fp32", "fp16"], default="int8")
    serve_.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda needs onnxruntime-gpu"
    )
    serve_.set_defaults(func=cmd_serve)

    generate = sub.add_parser("generate", help="continue a prompt, streaming, no server")
    add_generation_arguments(generate)
    generate.add_argument("prompt", metavar="PROMPT")
    generate.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal, no server")
    add_generation_arguments(chat)
    chat.add_argument("--system", help="a first system turn, e.g. 'You answer briefly.'")
    chat.set_defaults(func=cmd_chat)

    quick = sub.add_parser("quickstart", help="train tiny, export, import and serve, in one go")
    quick.add_argument("--data", type=Path, default=Path("samples/corpus"))
    quick.add_argument("--name", default="demo")
    quick.add_argument("--output", type=Path, default=Path("runs/quickstart"))
    quick.add_argument("--num_train_epochs", type=float, default=20.0)
    quick.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)))
    quick.add_argument("--no-serve", action="store_true", help="stop after the store import")
    quick.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"tailorgpt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
