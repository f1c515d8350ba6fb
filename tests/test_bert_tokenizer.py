"""GPT-2 with a BERT-style Chinese vocabulary (the uer/gpt2-chinese-* shape): trained,
exported and served with [SEP] as the end token and no spaces between Chinese characters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import make_bert_gpt2, run_cli, train_args
from transformers import BertTokenizerFast

from service.engine import GenerationRequest, LLMEngine
from service.engine.text import CJK


@pytest.fixture(scope="module")
def bert_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_bert_gpt2(tmp_path_factory.mktemp("bert-gpt2"))


@pytest.mark.model  # trains and exports
def test_train_export_and_serve_with_sep_and_no_spaces(
    bert_gpt2: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, data = bert_gpt2
    run = tmp_path / "run"
    run_cli(
        *train_args(
            run,
            "--block_size",
            "32",
            "--num_train_epochs",
            "30",
            "--learning_rate",
            "0.003",
            base_model=str(model_dir),
            data=data,
        )
    )
    sep_id = BertTokenizerFast.from_pretrained(model_dir).sep_token_id
    assert json.loads((run / "config.json").read_text())["eos_token_id"] == sep_id
    heldout = json.loads((run / "heldout.json").read_text())["input_ids"]
    assert any(sep_id in block for block in heldout)  # documents end with [SEP]

    run_cli("export", str(run), "--output", str(tmp_path / "export"))
    with LLMEngine(tmp_path / "export", "fp32", max_running=8) as engine:
        assert engine.scheduler.eos_token_id == sep_id
        results = engine.generate(
            [
                GenerationRequest(
                    prompt="用自己的文字", max_new_tokens=100, temperature=1.0, seed=s
                )
                for s in range(8)
            ]
        )
    texts = [r.text for r in results]
    assert not any(re.search(rf"[{CJK}] [{CJK}]", t) for t in texts), texts
    assert not any("[SEP]" in t or "[CLS]" in t for t in texts)
    assert any(r.finish_reason == "stop" for r in results), texts  # it learned to end
