"""Text generation with ONNX Runtime: usable and testable without BentoML.

The engine loads an export (ONNX graph with past key/values, tokenizer.json, config.json)
and generates for a batch of requests at once: prompts are left-padded, and each row gets
its own position ids and attention mask, so a prompt decodes the same alone or in a batch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

CJK = r"\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef"
CJK_SPACE = re.compile(
    rf"(?<=[{CJK}]) (?=[{CJK}])|(?<=[{CJK}]) (?=[^\s\w])|(?<=[^\s\w]) (?=[{CJK}])"
)
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx"}
MAX_NEW_TOKENS_LIMIT = 1024


class GenerationRequest(BaseModel):
    prompt: str = Field(min_length=1, description="Text to continue; must not be empty.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, description="Makes sampled output reproducible.")


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class _Row:
    """One request's decoding state inside a batch."""

    request: GenerationRequest
    prompt_ids: list[int]
    budget: int  # new tokens it may still produce (max_new_tokens, capped by the context)
    rng: np.random.Generator
    generated: list[int]
    finish_reason: str | None = None


class PromptTooLong(ValueError):
    pass


class OnnxGenerator:
    def __init__(self, model_dir: Path, variant: str = "int8", threads: int | None = None):
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self.context = int(config["n_positions"])
        self.eos_token_id = int(config["eos_token_id"])
        self.n_layer = int(config["n_layer"])
        self.n_head = int(config["n_head"])
        self.head_dim = int(config["n_embd"]) // self.n_head
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # WordPiece (BERT-style) decoding joins every token with a space, which is wrong
        # between Chinese characters; byte-level BPE keeps the text's own spacing.
        decoder = json.loads(self.tokenizer.to_str()).get("decoder") or {}
        self.spaces_between_tokens = decoder.get("type") == "WordPiece"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(
            str(model_dir / VARIANT_FILES[variant]), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        if self.spaces_between_tokens:
            text = CJK_SPACE.sub("", text)
        return text

    def check_prompt(self, prompt: str) -> list[int]:
        """The prompt's ids; PromptTooLong, saying what to change, if it leaves no room."""
        ids = self.encode(prompt)
        if len(ids) >= self.context:
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens; this model's context is {self.context} tokens "
                f"(prompt plus output): shorten the prompt to under {self.context} tokens"
            )
        return ids

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        rows = [self._new_row(r) for r in requests]
        input_ids, attention_mask, position_ids = self._left_pad([r.prompt_ids for r in rows])
        past = self._empty_past(len(rows))
        while any(r.finish_reason is None for r in rows):
            logits, past = self._forward(input_ids, attention_mask, position_ids, past)
            next_ids = [self._step(row, logits[i]) for i, row in enumerate(rows)]
            input_ids = np.array(next_ids, dtype=np.int64)[:, None]
            attention_mask = np.pad(attention_mask, ((0, 0), (0, 1)), constant_values=1)
            # Finished rows keep decoding filler until the batch ends; keep them in range.
            position_ids = np.minimum(position_ids[:, -1:] + 1, self.context - 1)
        return [self._result(r) for r in rows]

    def _new_row(self, request: GenerationRequest) -> _Row:
        ids = self.check_prompt(request.prompt)
        budget = min(request.max_new_tokens, self.context - len(ids))
        return _Row(request, ids, budget, np.random.default_rng(request.seed), [])

    def _left_pad(self, prompts: list[list[int]]) -> tuple[np.ndarray, ...]:
        width = max(len(p) for p in prompts)
        input_ids = np.full((len(prompts), width), self.eos_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = ids
            attention_mask[i, width - len(ids) :] = 1
        position_ids = np.maximum(attention_mask.cumsum(-1) - 1, 0)
        return input_ids, attention_mask, position_ids

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_head, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.n_layer)]

    def _forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        for layer in range(self.n_layer):
            feeds[f"past_key_values.{layer}.key"] = past[2 * layer]
            feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
        logits, *present = self.session.run(None, feeds)
        return logits[:, -1, :], present

    def _step(self, row: _Row, logits: np.ndarray) -> int:
        """Pick the row's next token and record it; finished rows just feed EOS."""
        if row.finish_reason is not None:
            return self.eos_token_id
        token = sample(logits, row.request.temperature, row.request.top_p, row.rng)
        if token == self.eos_token_id:
            row.finish_reason = "stop"
            return token
        row.generated.append(token)
        if len(row.generated) >= row.budget:
            row.finish_reason = "length"
        return token

    def _result(self, row: _Row) -> Generation:
        return Generation(
            text=self.decode(row.generated),
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(row.generated),
            finish_reason=row.finish_reason or "length",
        )


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0, else nucleus sampling at that temperature."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])
