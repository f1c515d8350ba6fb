"""Chat templates: the default is exactly the layout `prepare` gives chat records, export
writes it, a reply stops at the next turn, templates run sandboxed, and a model without one
gets a 400 that says how to add one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from export.onnx import write_chat_template
from service.engine import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    read_chat_template,
)
from service.server.openai_api import ApiConfig, ChatCompletionRequest, create_app
from training.prepare import chat_to_text

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Two\nlines"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "And?"},
    ],
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("messages", CHATS)
def test_the_default_is_the_layout_prepare_writes(messages: list[dict[str, str]]) -> None:
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    assert template.render(messages, add_generation_prompt=False) == chat_to_text(messages)
    assert template.render(messages) == chat_to_text(messages) + "\n\nassistant:"


def test_a_reply_stops_where_the_next_turn_starts() -> None:
    default = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    assert default.stops == ["\n\nsystem:", "\n\nuser:", "\n\nassistant:"]
    chatml = ChatTemplate(CHATML).stops
    assert chatml[1] == "<|im_end|>\n<|im_start|>user\n"
    request = ChatCompletionRequest.model_validate({**{"messages": CHATS[0]}, "stop": "END"})
    [generation] = request.generation_requests(default)
    assert generation.stop == ["END", *default.stops]
    assert generation.prompt == "user: Hi\n\nassistant:"


def test_templates_run_in_a_sandbox() -> None:
    with pytest.raises(ChatTemplateError, match="does not render"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_export_writes_the_template_and_a_file_overrides_it(
    export_dir: Path, tmp_path: Path
) -> None:
    assert read_chat_template(export_dir) is not None  # the session export has one
    config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # as transformers saves one
    write_chat_template(tmp_path, None)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written == {"model_max_length": 256, "chat_template": CHATML}
    assert not (tmp_path / "chat_template.jinja").exists()
    write_chat_template(tmp_path, "{{ messages[0]['content'] }}")
    assert read_chat_template(tmp_path).render(CHATS[0]) == "Hi"  # type: ignore[union-attr]
    override = tmp_path / "mine.jinja"
    override.write_text(CHATML)
    assert read_chat_template(export_dir, override).stops == ChatTemplate(CHATML).stops


def test_a_model_without_a_template_says_how_to_add_one() -> None:
    app = create_app(lambda: pytest.fail("no engine needed"), ApiConfig("m", None))
    response = TestClient(app).post("/chat/completions", json={"messages": CHATS[0]})
    assert response.status_code == 400
    assert "--chat_template FILE" in response.json()["error"]["message"]
