"""The generation engine: plain Python + onnxruntime, usable and testable without a server.

Its public names are these; the server, the CLI and export import nothing else from it
(import-linter, `make test`). Inside, as in vLLM: params (requests, sampling, events), a
scheduler that only decides, the model runner (ONNX Runtime, KV cache), the engine core (the
loop that runs the plan and samples), the output processor and one async stream.
"""

from service.engine.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    HOW_TO_ADD,
    ChatTemplate,
    ChatTemplateError,
    read_chat_template,
    template_file,
)
from service.engine.llm_engine import AsyncStream, LLMEngine
from service.engine.lora import AdapterError
from service.engine.metrics import REJECTED
from service.engine.numerics import cpu_flags, decode_logits, nll, perplexity
from service.engine.params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS_LIMIT,
    MAX_STOP,
    MAX_STOP_TOKEN_IDS,
    SCHEDULING_POLICIES,
    Event,
    FinishReason,
    Generation,
    GenerationRequest,
    ModelInfo,
    QueueFull,
    RequestError,
    RequestStats,
    StructuredOutputs,
    TokenLogprob,
)
from service.engine.runner import Chunk, ModelRunner
from service.engine.text import TextCodec

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "HOW_TO_ADD",
    "MAX_LOGIT_BIAS",
    "MAX_LOGPROBS",
    "MAX_NEW_TOKENS_LIMIT",
    "MAX_STOP",
    "MAX_STOP_TOKEN_IDS",
    "REJECTED",
    "SCHEDULING_POLICIES",
    "AdapterError",
    "AsyncStream",
    "ChatTemplate",
    "ChatTemplateError",
    "Chunk",
    "Event",
    "FinishReason",
    "Generation",
    "GenerationRequest",
    "LLMEngine",
    "ModelInfo",
    "ModelRunner",
    "QueueFull",
    "RequestError",
    "RequestStats",
    "StructuredOutputs",
    "TextCodec",
    "TokenLogprob",
    "cpu_flags",
    "decode_logits",
    "nll",
    "perplexity",
    "read_chat_template",
    "template_file",
]
