"""Chat templates: a conversation as the text a model was trained on (Hugging Face's
`chat_template`, a Jinja template in tokenizer_config.json), rendered in a sandbox because a
model's files are not trusted code.

The default is the format `tailorgpt prepare` gives chat records: one `role: content`
paragraph per message. A reply ends where the model starts the next turn, so the text that
starts each role's turn is a stop string too (found by rendering, whatever the template).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# training/prepare.py's chat_to_text, then the start of the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nassistant:' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
HOW_TO_ADD = (
    "re-export the model with this version of tailorgpt (export writes one), pass "
    "'tailorgpt export --chat_template FILE', or serve with '--chat_template FILE' "
    "(TAILORGPT_CHAT_TEMPLATE)"
)
_MARK = "\x00{}\x00"  # contents no template changes, to find what lies between them


class ChatTemplateError(ValueError):
    """A template that does not render; the message says which and why."""


class ChatTemplate:
    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self.template = env.from_string(source)
            self.stops = self._turn_starts()
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template does not render: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)

    def _turn_starts(self) -> list[str]:
        """What each role's turn starts with after another's content, trailing spaces off:
        the model writing it has ended its own turn."""
        stops = []
        first, second = _MARK.format(1), _MARK.format(2)
        for role in ROLES:
            turns = [{"role": "user", "content": first}, {"role": role, "content": second}]
            text = self.render(turns, add_generation_prompt=False)
            between = text.partition(first)[2].partition(second)[0]
            if between.strip():
                stops.append(between.rstrip(" "))
        return list(dict.fromkeys(stops))


def read_chat_template(model_dir: Path, override: Path | None = None) -> ChatTemplate | None:
    """The template in `override` (a file), else the model's tokenizer_config.json's, else
    None. A list of named templates (Hugging Face allows one) gives its "default"."""
    if override is not None:
        return ChatTemplate(template_file(override))
    config_path = Path(model_dir) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    source = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(source, list):
        source = {t.get("name"): t.get("template") for t in source}.get("default")
    return ChatTemplate(source) if isinstance(source, str) else None


def template_file(path: Path) -> str:
    """A chat template file's text, checked to render; ChatTemplateError says what is wrong."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: cannot read the chat template ({e})") from None
    try:
        ChatTemplate(source)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"{path}: {e}") from None
    return source
