"""The `tailorgpt` command line: one subcommand per stage, plus quickstart for all of them."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from artifacts import UserError
from tailorgpt.config import CommandParser, as_options
from tailorgpt.options import (
    ChatArgs,
    EvaluateArgs,
    ExportArgs,
    GenerateArgs,
    PlanArgs,
    QuickstartArgs,
    SamplingArgs,
    ServeArgs,
)
from training.arguments import PrepareArgs, TrainArgs

QUICKSTART_MARKER = "quickstart.json"


def cmd_prepare(args: argparse.Namespace) -> None:
    from training.prepare import format_table, prepare

    options = as_options(PrepareArgs, args)
    print(format_table(prepare(options)))
    output = options.output_dir
    print(f"prepared {output}: train with 'tailorgpt train --train_file {output} ...'")


def cmd_train(args: argparse.Namespace) -> None:
    from training.train import train

    train_args = as_options(TrainArgs, args)
    metrics = train(train_args)
    if not metrics:
        return  # a torchrun worker other than the main process: it writes nothing
    run, tailorgpt = train_args.output_dir, tailorgpt_command()
    name = store_name(run)
    print(training_summary(metrics, run))
    print(f"talk to it:         {tailorgpt} chat {run}")
    print(
        f"serve it over HTTP: {tailorgpt} export {run} --output_dir {run}-export --name {name}\n"
        f"                    then {tailorgpt} serve --model tailorgpt-{name}:latest"
    )
    if train_args.save_adapter:
        print(f"its LoRA adapter:   {tailorgpt} export {run} --adapter --output_dir {run}-adapter")


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
    from training.data import resolve_block_size
    from training.plan import (
        base_config,
        check_fits,
        compare_modes,
        describe,
        describe_speed,
        gpu_hardware,
        make_plan,
        plan_all,
        plan_gpus,
    )

    options = as_options(PlanArgs, args)
    if options.gpus and (options.model_name_or_path or options.all or options.measure):
        raise UserError(
            "--gpus plans every built-in size: drop --model_name_or_path/--all/--measure"
        )
    if (options.model_name_or_path is None) == (not options.all) and not options.gpus:
        raise UserError("give --model_name_or_path MODEL, or --all for every built-in size")
    if options.train_tokens and not options.measure:
        raise UserError("--train_tokens: add --measure, the time per epoch is measured")
    batch, lora_r = options.per_device_train_batch_size, options.lora_r
    if options.gpus:
        hardware = gpu_hardware(options.gpu, options.gpu_memory_gb)
        block_size = resolve_block_size(options.block_size, base_config("gpt2"))
        print(plan_gpus(hardware, options.gpus, block_size, batch, lora_r))
        return
    if options.all:
        block_size = resolve_block_size(options.block_size, base_config("gpt2"))
        print(plan_all(block_size, batch, lora_r, options.measure, options.train_tokens))
        return
    config = base_config(options.model_name_or_path)
    block_size = resolve_block_size(options.block_size, config)
    plan = make_plan(config, block_size, batch, options.lora, lora_r=lora_r)
    print(describe(plan, block_size))
    print(compare_modes(config, block_size, batch, lora_r))
    if options.measure:
        print(describe_speed(config, plan, block_size, options.train_tokens))
    check_fits(plan, block_size)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate

    options = as_options(EvaluateArgs, args)
    metrics = evaluate(options.run_dir, options.validation_file, options.block_size)
    print(json.dumps(metrics, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    options = as_options(ExportArgs, args)
    if options.adapter:
        cmd_export_adapter(options)
        return
    from export.onnx import export
    from export.store import check_name, import_to_store

    if options.name:
        check_name(options.name)  # before the export, which takes a while
    output = options.output_dir
    parity = export(
        options.source, output, options.fp16, options.validation_file, options.chat_template
    )
    print(
        f"exported {output}: int8 greedy agreement "
        f"{parity['int8']['greedy_agreement']:.3f} "
        f"({parity['int8_kv_int8']['greedy_agreement']:.3f} with the int8 KV cache), "
        f"fp32 max |logit diff| {parity['fp32']['max_abs_logit_diff']:.2e}"
    )
    if options.name:
        print(f"imported into the BentoML model store as {import_to_store(output, options.name)}")


ONNX_OPTIONS = ("fp16", "validation_file", "chat_template")  # what an adapter has no graph for


def cmd_export_adapter(options: ExportArgs) -> None:
    """`export --adapter`: the run's adapter unmerged, and how to serve it over its base."""
    from export.adapter import export_adapter

    if given := [f"--{name}" for name in ONNX_OPTIONS if getattr(options, name)]:
        raise UserError(f"--adapter exports no ONNX graphs: drop {' '.join(given)}")
    output, tailorgpt = options.output_dir, tailorgpt_command()
    manifest = export_adapter(options.source, output)
    base = manifest["base_model"]
    print(
        f"exported the adapter of {options.source} to {output}: r {manifest['r']}, alpha "
        f"{manifest['lora_alpha']}, trained on {base} (weights {manifest['base_fingerprint']})"
    )
    if options.name:
        print("not imported into the BentoML store: an adapter is served from its folder")
    base_name = store_name(Path(base))
    print(
        f"serve it over its base, exported once with: {tailorgpt} export {base} --output_dir "
        f"{base}-export --name {base_name}\n"
        f"  then {tailorgpt} serve --model tailorgpt-{base_name}:latest "
        f"--lora_modules {options.name or store_name(output)}={output}"
    )


def serve(settings: dict[str, Any], host: str, port: int) -> None:
    """Run `bentoml serve` on the service in the foreground, with these settings over those
    of the environment; all checked first, a bad one a one-line error."""
    import bentoml
    from bentoml.exceptions import NotFound

    from service.engine import ChatTemplateError, template_file
    from service.server.settings import SettingError, api_keys, as_environment, settings_from

    env = {**os.environ, **as_environment(settings)}
    try:
        chosen = settings_from(env)
        keys = api_keys(chosen, env)
        if chosen.chat_template:
            template_file(chosen.chat_template)
    except (SettingError, ChatTemplateError) as err:
        raise UserError(str(err)) from None
    model = chosen.model
    try:
        bentoml.models.get(model)
    except NotFound:
        raise UserError(
            f"model {model} is not in the BentoML store: run 'tailorgpt export RUN_DIR "
            "--output_dir EXPORT_DIR --name NAME' first, or pick one from 'bentoml models list'"
        ) from None
    url = f"http://{host}:{port}"
    auth = " -H 'Authorization: Bearer KEY'" if keys else ""
    print(
        f"serving {model} ({chosen.variant}) on {url}"
        f"{f', {len(keys)} API key(s) required' if keys else ''}; try:\n"
        f"  curl -s -X POST {url}/generate{auth} -H 'Content-Type: "
        'application/json\' -d \'{"requests": [{"prompt": "Hello", '
        '"max_new_tokens": 32}]}\'\n'
        f"  curl -sN {url}/v1/completions{auth} -H 'Content-Type: "
        'application/json\' -d \'{"prompt": "Hello", "max_tokens": 32, "stream": true}\'\n'
        f"  or any OpenAI client: base_url {url}/v1, model {model.split(':')[0]}",
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service.server.service:TailorGPT",
        "--host",
        host,
        "--port",
        str(port),
        "--working-dir",
        str(Path(__file__).resolve().parent.parent),
    ]
    raise SystemExit(subprocess.call(command, env=env))


def cmd_serve(args: argparse.Namespace) -> None:
    options = asdict(as_options(ServeArgs, args))
    host, port = options.pop("host"), options.pop("port")
    serve(options, host, port)


def cmd_generate(args: argparse.Namespace) -> None:
    from tailorgpt.chat import generate

    options = as_options(GenerateArgs, args)
    sampling = asdict(as_options(SamplingArgs, args))
    generate(options.model, options.prompt, options.variant, sampling, options.lora)


def cmd_chat(args: argparse.Namespace) -> None:
    from tailorgpt.chat import chat

    options = as_options(ChatArgs, args)
    sampling = asdict(as_options(SamplingArgs, args))
    chat(options.model, options.variant, sampling, options.system, options.lora)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from export.onnx import export
    from export.store import MODEL_PREFIX, check_name, import_to_store
    from training.train import train

    options = as_options(QuickstartArgs, args)
    check_name(options.name)
    workspace = options.output_dir
    if workspace.exists():
        if not (workspace / QUICKSTART_MARKER).is_file():
            raise UserError(
                f"{workspace} exists and is not a quickstart workspace: choose another --output_dir"
            )
        shutil.rmtree(workspace)  # quickstart owns this folder and rebuilds it each time
    workspace.mkdir(parents=True)
    (workspace / QUICKSTART_MARKER).write_text(
        json.dumps({"train_file": str(options.train_file)}) + "\n"
    )
    print(f"[1/3] training the tiny preset on {options.train_file}", flush=True)
    metrics = train(
        TrainArgs(
            train_file=options.train_file,
            model_name_or_path="tiny",
            output_dir=workspace / "run",
            block_size=64,
            num_train_epochs=options.num_train_epochs,
        )
    )
    print(f"[2/3] exporting to ONNX (fp32 + int8) in {workspace / 'export'}", flush=True)
    parity = export(workspace / "run", workspace / "export")
    tag = import_to_store(workspace / "export", options.name)
    print(f"[3/3] imported {tag}")
    summary = {"tag": tag, "training": metrics, "parity": parity}
    (workspace / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(training_summary(metrics, workspace / "run"))
    print(f"summary in {workspace / 'summary.json'}")
    model = f"{MODEL_PREFIX}{options.name}"
    print(f"talk to it in a terminal, no server needed: {tailorgpt_command()} chat {model}")
    if options.no_serve:
        print(f"serve it over HTTP: {tailorgpt_command()} serve --model {model}:latest")
    else:
        serve({"model": f"{model}:latest", "variant": "int8"}, "127.0.0.1", options.port)


class Command(NamedTuple):
    summary: str
    run: Callable[[argparse.Namespace], None]
    options: list[type]  # the dataclasses its options come from


COMMANDS = {
    "prepare": Command(
        "clean, dedup and split your files into a dataset", cmd_prepare, [PrepareArgs]
    ),
    "plan": Command("hardware, memory needed, and settings that fit", cmd_plan, [PlanArgs]),
    "train": Command("fine-tune a GPT-2 on your text", cmd_train, [TrainArgs]),
    "evaluate": Command("perplexity of a trained run on some text", cmd_evaluate, [EvaluateArgs]),
    "export": Command(
        "ONNX fp32 + int8, parity, store import; or a LoRA adapter", cmd_export, [ExportArgs]
    ),
    "serve": Command("serve a stored model with bentoml serve", cmd_serve, [ServeArgs]),
    "generate": Command(
        "continue a prompt, streaming, no server", cmd_generate, [GenerateArgs, SamplingArgs]
    ),
    "chat": Command(
        "chat with a model in the terminal, no server", cmd_chat, [ChatArgs, SamplingArgs]
    ),
    "quickstart": Command(
        "train tiny, export, import and serve, in one go", cmd_quickstart, [QuickstartArgs]
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailorgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name, command in COMMANDS.items():
        summary, options = command.summary, command.options
        parsed = sub.add_parser(name, help=summary, description=summary, dataclass_types=options)
        parsed.set_defaults(func=command.run)
    return parser


def run(argv: list[str] | None) -> None:
    try:
        args = build_parser().parse_args(argv)  # a --config file can be wrong: a UserError
        args.func(args)
    except UserError as err:
        print(f"tailorgpt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        sys.stdout.flush()  # a closed pipe (`| head`) then shows here, not at exit


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except BrokenPipeError:
        # The reader of our output is gone: end quietly, as Unix tools do on SIGPIPE (see
        # "Note on SIGPIPE" in Python's signal docs). Output still buffered goes nowhere,
        # instead of failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, what a shell shows for `head`'s writer
