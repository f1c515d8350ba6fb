"""What a request asks for and what it gets back; every layer of the engine imports these."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_NEW_TOKENS_LIMIT = 4096
SEED_LIMIT = 2**64  # numpy's generator takes any non-negative seed; OpenAI's is an int64


MAX_LOGPROBS = 20
MAX_STOP = 8  # stop strings: each is searched for after every token
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_STOP_TOKEN_IDS = 64
SCHEDULING_POLICIES = ("fcfs", "priority")


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs: exactly one of these constrains the output."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    json_schema: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON schema the output is an instance of."
    )
    regex: str | None = Field(None, description="A regular expression the output matches.")
    choice: list[str] | None = Field(
        None, min_length=1, max_length=1024, description="The output is one of these."
    )
    grammar: str | None = Field(None, description="A Lark or GBNF grammar of the output.")
    json_object: bool | None = Field(None, description="The output is a JSON object.")

    @model_validator(mode="after")
    def exactly_one(self) -> StructuredOutputs:
        given = [name for name, value in self if value not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of json, regex, choice, grammar, json_object, not "
                f"{given or 'none'}"
            )
        return self

    def source(self) -> tuple[str, str]:
        """(kind, text) as llguidance compiles it."""
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.json_schema is not None:
            text = self.json_schema
            return "json", text if isinstance(text, str) else json.dumps(text, sort_keys=True)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        return "grammar", self.grammar or ""


class GenerationRequest(BaseModel):
    prompt: str | list[int] = Field(description="Text to continue, or its token ids.")
    model: str | None = Field(
        None,
        description="A LoRA adapter this server has loaded (GET /v1/models lists them), by "
        "name; none, or the served model's name: the base model.",
    )
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_k: int = Field(0, ge=0, description="Keep only the k likeliest tokens; 0 keeps all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 means none.")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted once from each generated token."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted per time a token was generated."
    )
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] = Field(
        default_factory=dict,
        max_length=MAX_LOGIT_BIAS,
        description="Added to the logits of these token ids, from -100 (never) to 100 (always).",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return each token's log-probability and this many likeliest alternatives.",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Return each prompt token's log-probability (the first has none) and "
        "this many likeliest alternatives.",
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP,
        description="Strings that end the output (not included in it).",
    )
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT, description="Makes sampled output reproducible."
    )
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")
    stop_token_ids: list[int] = Field(
        default_factory=list,
        max_length=MAX_STOP_TOKEN_IDS,
        description="Token ids that end the output, as the end-of-text token does (vLLM's).",
    )
    min_tokens: int = Field(
        0,
        ge=0,
        le=MAX_NEW_TOKENS_LIMIT,
        description="The end-of-text token and stop_token_ids cannot come before this many "
        "tokens (vLLM's).",
    )
    include_stop_str_in_output: bool = Field(
        False, description="Keep the stop string that ended the output in it (vLLM's)."
    )
    priority: int = Field(
        0,
        ge=-(2**31),
        lt=2**31,
        description="Lower runs first, as vLLM's; only with the priority scheduling policy.",
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="Constrain the output to a JSON schema, a regex, a choice or a grammar."
    )

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if not prompt:
            raise ValueError("the prompt is empty: send some text or token ids")
        return prompt

    @model_validator(mode="after")
    def min_within_max(self) -> GenerationRequest:
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) is over max_new_tokens ({self.max_new_tokens})"
            )
        return self


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model, with its likeliest alternatives."""

    token_id: int
    logprob: float | None  # None for a prompt's first token: nothing comes before it
    top: list[tuple[int, float]]


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestStats:
    """One request's (one sample's) numbers, as the request log reports them."""

    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float | None  # None until it gets a slot
    ttft_seconds: float | None  # None until its first token
    finish_reason: FinishReason | None  # None while it runs
    sample: int = 0  # which of the request's n samples: the prompt counts once for all


@dataclass
class ModelInfo:
    """What an engine serves."""

    name: str
    context: int  # tokens, prompt plus output
    variant: str
    device: str
    kv_cache_dtype: str


@dataclass
class Event:
    """New text for one request; the last event of a request carries its finish_reason
    and its stats."""

    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens since the last event
    prompt_logprobs: list[TokenLogprob] | None = None  # in the first event, if asked
    stats: RequestStats | None = None  # in the last event


class RequestError(ValueError):
    """A request this engine cannot run; the message says what to change."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""
