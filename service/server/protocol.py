"""The wire protocol of every route: request and answer models, and the error answers.

The routes (service/server/openai_api.py, service/server/service.py) build their answers from
these models, the middleware (service/server/guards.py) its refusals, and /docs.json
(service/server/openapi.py) publishes their schemas: one declaration of each shape.

What real clients send is accepted: `null` for any optional field means its default, and a
field OpenAI does not define is ignored (and logged once). A field OpenAI defines whose effect
this server cannot give (`suffix`, `tools`) is a 400 naming it, rather than an answer that
silently is not what was asked.

Answers are dumped with `wire()`: a field an answer does not set is left out (`usage` of a
streamed chunk, the `delta` of a whole chat answer), a null it sets is kept (as OpenAI's).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.engine import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_STOP,
    MAX_STOP_TOKEN_IDS,
    ChatTemplate,
    QueueFull,
    StructuredOutputs,
)

# /generate's request and answer: the engine's own.
from service.engine import Generation as Generation
from service.engine import GenerationRequest as GenerationRequest
from service.server.requestlog import log_event

# --- requests --------------------------------------------------------------------------------

MAX_PROMPTS = 64  # prompts in one request
MAX_N = 16  # samples per prompt
MAX_MESSAGES = 1024
# Chat fields OpenAI defines that change nothing here: accepted without a word.
CHAT_FIELDS_IGNORED = frozenset(
    {
        "metadata",
        "modalities",
        "parallel_tool_calls",
        "prediction",
        "prompt_cache_key",
        "reasoning_effort",
        "safety_identifier",
        "service_tier",
        "store",
        "tool_choice",
        "function_call",
        "verbosity",
        "web_search_options",
    }
)
_logged_fields: set[str] = set()


class BadRequest(ValueError):
    """A request this server will not run; `param` is the field to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(
        False, description="vLLM's: usage (so far) in every chunk."
    )


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise BadRequest(
                "response_format",
                'response_format: {"type": "json_schema"} needs json_schema.schema',
            )
        return StructuredOutputs(json=self.json_schema.schema_)


class ClientRequest(BaseModel):
    """A request of a client route (/v1/*, /tokenize, /detokenize): `null` for a field means its
    default, as in OpenAI's API."""

    # strict: `true` is not token id 1; extra fields are ignored (see ignored_fields).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class OpenAIRequest(ClientRequest):
    """What completions and chat share; top_k, repetition_penalty and ignore_eos are vLLM's."""

    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = Field(None, description="Accepted; not used.")
    top_k: int | None = Field(0, ge=0)
    repetition_penalty: float | None = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool | None = False
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="vLLM's: token ids that end the output, as the end-of-text token."
    )
    min_tokens: int | None = Field(
        0,
        ge=0,
        le=MAX_NEW_TOKENS_LIMIT,
        description="vLLM's: no end-of-text token or stop_token_ids before this many tokens.",
    )
    include_stop_str_in_output: bool | None = Field(
        False, description="vLLM's: keep the stop string that ended the output in it."
    )
    priority: int | None = Field(
        0,
        ge=-(2**31),
        lt=2**31,
        description="vLLM's: lower runs first; only with TAILORGPT_SCHEDULING_POLICY=priority.",
    )
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's: text, json_object, or json_schema (its `schema`)."
    )
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: exactly one of json, regex, choice, grammar, json_object."
    )

    def ignored_fields(self, quiet: frozenset[str] = frozenset()) -> None:
        """Log each field name this server does not know, once per process."""
        for name in (self.model_extra or {}).keys() - quiet - _logged_fields:
            _logged_fields.add(name)
            log_event("ignored_field", field=name, route=type(self).__name__)

    def generation_request(
        self,
        prompt: str | list[int],
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
    ) -> GenerationRequest:
        structured = self.structured_outputs
        if self.response_format is not None:
            if structured is not None and self.response_format.type != "text":
                raise BadRequest(
                    "structured_outputs",
                    "structured_outputs: give it or response_format, not both",
                )
            structured = structured or self.response_format.structured()
        if (self.min_tokens or 0) > max_tokens:
            raise BadRequest(
                "min_tokens",
                f"min_tokens: {self.min_tokens} is over max_tokens ({max_tokens}): lower it",
            )
        return GenerationRequest(
            prompt=prompt,
            model=self.model,
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias or {},
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop or [],
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop_token_ids=self.stop_token_ids or [],
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            priority=self.priority,
            structured_outputs=structured,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(OpenAIRequest):
    """OpenAI's completion request."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text or token ids; a list of either for several completions at once."
    )
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = Field(False, description="Put the prompt before each completion's text.")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="Only best_of = n is supported.")
    suffix: str | None = Field(None, description="Not supported: a non-empty one is refused.")

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError(
                "this server does not insert text between a prompt and a suffix: send the "
                "text before the insertion point as the prompt, without suffix"
            )
        return suffix

    def prompts(self) -> list[str] | list[list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        if not 0 < len(prompt) <= MAX_PROMPTS:
            raise BadRequest(
                "prompt", f"prompt: send 1 to {MAX_PROMPTS} prompts, not {len(prompt)}"
            )
        return prompt  # type: ignore[return-value]

    def generation_requests(self) -> list[GenerationRequest]:
        if self.best_of not in (None, self.n):
            raise BadRequest(
                "best_of",
                f"best_of: only best_of = n is supported (n is {self.n}): leave best_of out",
            )
        self.ignored_fields()
        # Echoed with log-probabilities, the prompt is scored too.
        scored = self.logprobs if self.echo else None
        return [
            self.generation_request(p, self.max_tokens, self.logprobs, scored)
            for p in self.prompts()
        ]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def as_turn(self) -> dict[str, str]:
        """The message as the template takes it: text content, OpenAI's `developer` as the
        `system` models were trained with."""
        content = self.content
        if isinstance(content, list):
            if kinds := {p.type for p in content} - {"text"}:
                raise BadRequest("messages", f"messages: only text content, not {sorted(kinds)}")
            content = "".join(p.text or "" for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="Default: as many as the context fits."
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_LIMIT, description="OpenAI's older max_completion_tokens."
    )
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: none or [].")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported: none or [].")

    @field_validator("tools", "functions")
    @classmethod
    def no_tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if tools:
            raise ValueError("this model does not call tools: leave tools and functions out")
        return tools

    def generation_requests(self, template: ChatTemplate) -> list[GenerationRequest]:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs", "top_logprobs: set logprobs to true as well")
        self.ignored_fields(CHAT_FIELDS_IGNORED)
        prompt = template.render([m.as_turn() for m in self.messages])
        max_tokens = self.max_completion_tokens or self.max_tokens or MAX_NEW_TOKENS_LIMIT
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        request = self.generation_request(prompt, max_tokens, logprobs)
        # The next turn's start ends the reply; past the client's own stop strings.
        return [request.model_copy(update={"stop": request.stop + template.stops})]


class TokenizeCompletionRequest(ClientRequest):
    """vLLM's /tokenize of a prompt: the token ids it runs as."""

    prompt: str
    add_special_tokens: bool | None = Field(
        True, description="Accepted; this server adds no special tokens to a prompt either way."
    )


class TokenizeChatRequest(ClientRequest):
    """vLLM's /tokenize of messages, laid out by the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool | None = Field(
        True, description="End with the start of the assistant's turn, as a chat request does."
    )
    add_special_tokens: bool | None = Field(False, description="Accepted; none are added.")


class DetokenizeRequest(ClientRequest):
    """vLLM's /detokenize: the text of token ids."""

    tokens: list[int] = Field(max_length=2 * MAX_NEW_TOKENS_LIMIT)


# --- answers ---------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "error"]  # a cancelled request is told "stop"


def wire(answer: BaseModel) -> dict[str, Any]:
    """The answer as JSON sends it: the fields it sets, nulls included."""
    return answer.model_dump(exclude_unset=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completion format: token strings, their log-probabilities (null for an
    echoed prompt's first token), the likeliest alternatives of each, where each starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A whole completion, or (with `stream: true`) one Server-Sent Event's chunk of one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut | None = None  # whole answers
    delta: ChatMessageOut | None = None  # streamed chunks
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """A whole chat completion, or (with `stream: true`) one Server-Sent Event's chunk of one."""

    id: str
    object: Literal["chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class Model(BaseModel):
    """OpenAI's model, with vLLM's `root`, `parent` and `max_model_len` (the context)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter body: the name requests give as `model`, and the
    adapter's directory (inside the server's TAILORGPT_LORA_DIR)."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[\w.:@+=-]+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None  # vLLM's clients may send it; names identify adapters here


class TokenizeResponse(BaseModel):
    """As vLLM's: the ids, how many, and the context they must fit with the output."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    """GET /version: the tailorgpt package's version, as vLLM's /version gives its own."""

    version: str


# --- errors ----------------------------------------------------------------------------------

RETRY_AFTER_SECONDS = 1


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error body: every refusal of this server has this shape."""

    error: ErrorDetail


def error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(wire(body), status_code=status, headers=headers)


def invalid(e: ValidationError) -> JSONResponse:
    """400 whose `param` is the top-level field, as OpenAI's is. A value that matched no type
    of a union gets one error per type: the message gives the error of the type it had (a list
    too long), else what each type wanted."""
    errors = e.errors()
    loc = errors[0]["loc"]
    param = str(loc[0]) if loc else "body"
    field = [x for x in errors if x["loc"][:1] == loc[:1]]
    union = len(field) > 1  # its locations name union members: say the field alone
    where = param if union else ".".join(str(p) for p in loc) or param
    field = [x for x in field if not x["type"].endswith("_type")] or field
    wanted = "; or ".join(dict.fromkeys(x["msg"] for x in field))
    return error(400, f"{where}: {wanted}", "invalid_request_error", param)


def busy(e: QueueFull) -> JSONResponse:
    return error(
        503,
        f"server busy ({e}); retry after {RETRY_AFTER_SECONDS}s",
        "server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def no_route(http: Request) -> JSONResponse:
    return error(
        404,
        f"no route {http.method} {http.url.path} here: this server has GET /v1/models, "
        "GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions",
        "invalid_request_error",
    )


def wrong_method(http: Request, allowed: list[str]) -> JSONResponse:
    return error(
        405,
        f"{http.url.path} takes {' or '.join(m for m in allowed if m != 'HEAD')}, not "
        f"{http.method}",
        "invalid_request_error",
        headers={"Allow": ", ".join(allowed)},
        code="method_not_allowed",
    )


def not_served(asked: str, names: list[str]) -> JSONResponse:
    served = ", ".join(repr(name) for name in names)
    return error(
        404,
        f"model {asked!r} is not served here; this server serves {served} (GET /v1/models)",
        "invalid_request_error",
        "model",
        code="model_not_found",
    )
