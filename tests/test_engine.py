"""The ONNX Runtime engine against transformers, without BentoML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.engine import GenerationRequest, OnnxGenerator, PromptTooLong

PROMPTS = [
    "Clean text beats more text",
    "用自己的文字训练一个模型",
    "The",
    "When the validation loss stops falling while the training loss keeps falling, the model",
]


def greedy(prompt: str, max_new_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, temperature=0)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def engine(request: pytest.FixtureRequest, export_dir: Path) -> OnnxGenerator:
    return OnnxGenerator(export_dir, variant=request.param, threads=2)


def test_greedy_matches_transformers_generate(run_dir: Path, export_dir: Path) -> None:
    engine = OnnxGenerator(export_dir, variant="fp32")
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    model = AutoModelForCausalLM.from_pretrained(run_dir).eval()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        expected = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        result = engine.generate([greedy(prompt)])[0]
        assert result.text == tokenizer.decode(expected), prompt
        assert result.completion_tokens == len(expected)


def test_a_prompt_decodes_the_same_alone_and_in_a_batch(engine: OnnxGenerator) -> None:
    alone = [engine.generate([greedy(p)])[0] for p in PROMPTS]
    batched = engine.generate([greedy(p) for p in PROMPTS])
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in alone]


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: OnnxGenerator) -> None:
    sampled = GenerationRequest(prompt="The", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.generate([sampled])[0].text
    in_batch = engine.generate([greedy(PROMPTS[0]), sampled, greedy(PROMPTS[1])])[1].text
    assert alone == in_batch
    others = {engine.generate([sampled.model_copy(update={"seed": s})])[0].text for s in range(8)}
    assert len(others) > 1  # sampling does sample


def test_length_limit_and_finish_reason(engine: OnnxGenerator) -> None:
    result = engine.generate([GenerationRequest(prompt="The", max_new_tokens=3, temperature=0)])
    assert result[0].completion_tokens <= 3
    assert result[0].finish_reason == ("length" if result[0].completion_tokens == 3 else "stop")


def test_output_stops_at_the_context(engine: OnnxGenerator) -> None:
    long_prompt = "Clean text"
    while len(engine.encode(long_prompt + " beats more text")) < engine.context - 10:
        long_prompt += " beats more text"
    results = engine.generate([greedy(long_prompt, 1024), greedy("The", 8)])
    assert results[0].prompt_tokens + results[0].completion_tokens <= engine.context
    assert results[1].completion_tokens <= 8


def test_prompt_longer_than_the_context(engine: OnnxGenerator) -> None:
    with pytest.raises(PromptTooLong, match="context is 256 tokens"):
        engine.generate([greedy("word " * 400)])
