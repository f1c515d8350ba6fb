"""What a request asks for and what it gets back; every layer of the engine imports these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

MAX_NEW_TOKENS_LIMIT = 4096
SEED_LIMIT = 2**64  # numpy's generator takes any non-negative seed; OpenAI's is an int64


class GenerationRequest(BaseModel):
    prompt: str = Field(min_length=1, description="Text to continue; must not be empty.")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_k: int = Field(0, ge=0, description="Keep only the k likeliest tokens; 0 keeps all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 means none.")
    stop: list[str] = Field(
        default_factory=list,
        max_length=8,
        description="Strings that end the output (not included in it).",
    )
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="Makes sampled output reproducible."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")


FinishReason = Literal["stop", "length", "cancelled", "error"]


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass
class Event:
    """New text for one request; the last event of a request carries its finish_reason."""

    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class RequestError(ValueError):
    """A request this engine cannot run; the message says what to change."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""
