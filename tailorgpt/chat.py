"""Talk to a model in the terminal, no server: `tailorgpt chat` and `tailorgpt generate`.

The generation engine runs in this process and streams tokens as they come. A chat is sent
to the model laid out by its chat template, as the server's /v1/chat/completions does; without
one, in the format `tailorgpt prepare` gives chat records, one `role: content` paragraph per
turn, so a model fine-tuned on chats sees what it learned from.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from artifacts import MANIFEST, UserError, write_json
from service.engine import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    GenerationRequest,
    LLMEngine,
    RequestError,
    read_chat_template,
)

EXPORT_CACHE = "export-cache"  # inside a training run: its export, made on first use
RUN_STAMP = "run-stamp.json"  # in the cache: the run's files it was made from
PREPARE_LAYOUT = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
ACCEPTED = (
    "an export dir ('tailorgpt export'), a training run dir ('tailorgpt train') "
    "or a store tag tailorgpt-NAME[:version]"
)

Turn = tuple[str, str]  # (role, content)


def resolve_model(model: str) -> Path:
    """The export directory that MODEL names, exporting a training run first if need be."""
    path = Path(model)
    if (path / MANIFEST).is_file():
        kind = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind")
        if kind == "export":
            return path
        if kind == "train":
            return cached_export(path)
        raise UserError(f"MODEL {model} holds a '{kind}' artifact: give {ACCEPTED}")
    if not path.exists() and model.startswith("tailorgpt-"):
        return store_model(model)
    raise UserError(f"MODEL {model} is not a model: give {ACCEPTED}")


def store_model(tag: str) -> Path:
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        return Path(bentoml.models.get(tag).path)
    except (BentoMLException, ValueError):  # not found, or not a valid tag
        raise UserError(
            f"MODEL {tag} is not in the BentoML store: 'bentoml models list' shows what is"
        ) from None


def run_stamp(run_dir: Path) -> dict[str, list[int]]:
    """Size and modification time of the run's files: they change when it is retrained."""
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(run_dir.iterdir())
        if p.is_file()
    }


def cached_export(run_dir: Path) -> Path:
    """RUN/export-cache, exported now unless it was made from the run as it is."""
    from export.onnx import export

    cache = run_dir / EXPORT_CACHE
    stamp = run_stamp(run_dir)
    if (cache / RUN_STAMP).is_file() and json.loads((cache / RUN_STAMP).read_text()) == stamp:
        print(f"using {cache}, the export of training run {run_dir}", file=sys.stderr)
        return cache
    print(f"{run_dir} is a training run: exporting it to {cache} first", file=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)
    export(run_dir, cache)
    write_json(cache / RUN_STAMP, stamp)
    return cache


ADAPTER = "adapter"  # the name --lora's adapter is served under


def load_engine(model_dir: Path, variant: str, lora: Path | None = None) -> LLMEngine:
    """One sequence at a time (a single slot keeps the KV cache small), with --lora's
    adapter served over the model as ADAPTER."""
    return LLMEngine(
        model_dir, variant, max_running=1, lora_modules={ADAPTER: lora} if lora else None
    )


def chat_template(model_dir: Path) -> ChatTemplate:
    """The export's chat template, else the layout `prepare` gives chat records."""
    try:
        return read_chat_template(model_dir) or PREPARE_LAYOUT
    except ChatTemplateError as err:
        raise UserError(f"{model_dir}: {err}") from None


def make_request(prompt: str, options: dict[str, Any]) -> GenerationRequest:
    """A request checked as the API checks it; a bad option is a one-line error."""
    try:
        return GenerationRequest(prompt=prompt, **options)
    except ValidationError as err:
        problem = err.errors()[0]
        name = ".".join(str(part) for part in problem["loc"])
        raise UserError(f"--{name}: {problem['msg']}") from None


def refusal(engine: LLMEngine, request: GenerationRequest) -> str | None:
    """Why the engine would refuse the request (a prompt too long), or None."""
    try:
        engine.prompt_ids(request)
    except RequestError as err:
        return str(err)
    return None


def stream(engine: LLMEngine, request: GenerationRequest, pieces: list[str]) -> None:
    """Print the output as it comes, keeping each piece; leaving early (Ctrl-C) cancels the
    request."""
    try:
        with closing(engine.stream(request)) as events:
            for event in events:
                print(event.text, end="", flush=True)
                pieces.append(event.text)
    finally:
        print(flush=True)


def generate(
    model: str, prompt: str, variant: str, options: dict[str, Any], lora: Path | None = None
) -> None:
    request = make_request(prompt, options | {"model": ADAPTER if lora else None})
    engine = load_engine(resolve_model(model), variant, lora)
    if problem := refusal(engine, request):
        raise UserError(problem)
    stream(engine, request, [])


def chat_prompt(turns: list[Turn], template: ChatTemplate = PREPARE_LAYOUT) -> str:
    """The conversation as the template lays it out, then the start of the assistant's turn."""
    return template.render([{"role": role, "content": content} for role, content in turns])


def fit_turns(
    head: list[Turn],
    turns: list[Turn],
    count_tokens: Callable[[str], int],
    budget: int,
    template: ChatTemplate = PREPARE_LAYOUT,
) -> list[Turn]:
    """The newest turns whose prompt, after the head (the system turn), fits in `budget`
    tokens; the newest one always, for the engine to refuse if even it is too long."""
    start = 0
    while (
        start < len(turns) - 1
        and count_tokens(chat_prompt(head + turns[start:], template)) > budget
    ):
        start += 1
    return turns[start:]


def chat(
    model: str,
    variant: str,
    options: dict[str, Any],
    system: str | None,
    lora: Path | None = None,
) -> None:
    import readline  # noqa: F401  (line editing and history for input())

    # The options are checked before the model loads; each turn sets the prompt, and a
    # reply ends where the model starts the next turn.
    settings = make_request("-", options | {"model": ADAPTER if lora else None})
    model_dir = resolve_model(model)
    template = chat_template(model_dir)
    settings = settings.model_copy(update={"stop": settings.stop + template.stops})
    engine = load_engine(model_dir, variant, lora)
    budget = engine.context - settings.max_new_tokens

    def count_tokens(text: str) -> int:
        return len(engine.codec.encode(text))

    head: list[Turn] = [("system", system)] if system else []
    turns: list[Turn] = []
    print(
        f"chatting with {model} ({variant}, context {engine.context} tokens): /reset forgets "
        "the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply",
        file=sys.stderr,
    )
    while (message := read_message()) != "/exit":
        if message == "/reset":
            turns = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        kept = fit_turns(head, [*turns, ("user", message)], count_tokens, budget, template)
        request = settings.model_copy(update={"prompt": chat_prompt(head + kept, template)})
        if problem := refusal(engine, request):  # the message alone is too long: not sent
            print(f"({problem})", file=sys.stderr)
            continue
        if forgotten := len(turns) + 1 - len(kept):
            print(f"(forgot the oldest {forgotten} turns to fit)", file=sys.stderr)
        turns = [*kept, ("assistant", reply(engine, request))]


def read_message() -> str:
    """The user's next message; /exit at Ctrl-D or Ctrl-C."""
    try:
        while not (message := input("user: ").strip()):
            pass
        return message
    except (EOFError, KeyboardInterrupt):
        print()
        return "/exit"


def reply(engine: LLMEngine, request: GenerationRequest) -> str:
    """Stream the assistant's turn; Ctrl-C stops it and keeps what was said so far."""
    print("assistant:", end="", flush=True)
    pieces: list[str] = []
    try:
        stream(engine, request, pieces)
    except KeyboardInterrupt:
        print("(stopped)", file=sys.stderr)
    return "".join(pieces).strip()
