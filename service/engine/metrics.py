"""Prometheus metrics of an LLM server, named as vLLM and TGI users expect to find them.

Gauges sum over worker processes ("livesum") when BentoML runs several, each with its own
engine; counters and histograms add up across workers by construction.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Past the longest request a server lets run (TAILORGPT_MAX_LATENCY_MS's default is 120 s),
# so that its percentiles stay measurable rather than landing in +Inf.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 300)
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
LENGTH_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

PROMPT_TOKENS = Counter("tailorgpt_prompt_tokens", "Prompt tokens prefilled", ["model"])
GENERATED_TOKENS = Counter("tailorgpt_generated_tokens", "Tokens generated", ["model"])
REQUESTS = Counter("tailorgpt_requests", "Finished requests", ["model", "finish_reason"])
REJECTED = Counter("tailorgpt_requests_rejected", "Requests refused for load", ["model", "reason"])
TIME_TO_FIRST_TOKEN = Histogram(
    "tailorgpt_time_to_first_token_seconds",
    "Arrival to first token",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "tailorgpt_time_per_output_token_seconds",
    "Mean time between a request's tokens after its first, one sample per request",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "tailorgpt_request_seconds", "Arrival to last token", ["model"], buckets=LATENCY_BUCKETS
)
QUEUE_LENGTH = Gauge(
    "tailorgpt_queue_length", "Requests waiting for a slot", ["model"], multiprocess_mode="livesum"
)
RUNNING = Gauge(
    "tailorgpt_running_sequences",
    "Sequences in the running batch",
    ["model"],
    multiprocess_mode="livesum",
)
KV_CACHE_TOKENS = Gauge(
    "tailorgpt_kv_cache_tokens",
    "Tokens held in the KV cache",
    ["model"],
    multiprocess_mode="livesum",
)
KV_CACHE_RESERVED = Gauge(
    "tailorgpt_kv_cache_reserved_tokens",
    "KV budget reserved by running sequences (prompt + max_new_tokens each)",
    ["model"],
    multiprocess_mode="livesum",
)
PREFIX_CACHE_HITS = Counter(
    "tailorgpt_prefix_cache_hit_tokens",
    "Prompt tokens found in the prefix cache rather than prefilled",
    ["model"],
)
PREFIX_CACHE_TOKENS = Gauge(
    "tailorgpt_prefix_cache_tokens",
    "Tokens that free slots keep for prompts that start as theirs did",
    ["model"],
    multiprocess_mode="livesum",
)
QUEUE_SECONDS = Histogram(
    "tailorgpt_queue_seconds", "Arrival to admission (a slot)", ["model"], buckets=LATENCY_BUCKETS
)
PROMPT_LENGTH = Histogram(
    "tailorgpt_prompt_length_tokens",
    "Prompt tokens of each finished request",
    ["model"],
    buckets=LENGTH_BUCKETS,
)
OUTPUT_LENGTH = Histogram(
    "tailorgpt_output_length_tokens",
    "Generated tokens of each finished sequence",
    ["model"],
    buckets=LENGTH_BUCKETS,
)
MODEL_INFO = Gauge(
    "tailorgpt_model_info",
    "1 per worker serving this model, variant and device",
    ["model", "variant", "device"],
    multiprocess_mode="livesum",
)
LORA_ADAPTERS = Gauge(
    "tailorgpt_lora_adapters",
    "LoRA adapters: loaded (served by name) and resident (in the stacks, in memory)",
    ["model", "state"],
    multiprocess_mode="livesum",
)
LORA_MEMORY_BYTES = Gauge(
    "tailorgpt_lora_memory_bytes",
    "Memory of the resident adapters' stack rows, and the most they may take (max_loras)",
    ["model", "kind"],
    multiprocess_mode="livesum",
)
LORA_EVICTIONS = Counter(
    "tailorgpt_lora_evictions", "Adapters evicted from the stacks (least recently used)", ["model"]
)
LORA_LOAD_SECONDS = Histogram(
    "tailorgpt_lora_load_seconds",
    "Reading and checking an adapter's files (a load, or a read again after an eviction)",
    buckets=LATENCY_BUCKETS,
)
LORA_REQUESTS = Counter(
    "tailorgpt_lora_requests", "Finished requests per adapter", ["model", "adapter"]
)
LORA_GENERATED_TOKENS = Counter(
    "tailorgpt_lora_generated_tokens", "Tokens generated per adapter", ["model", "adapter"]
)
LORA_PROMPT_TOKENS = Counter(
    "tailorgpt_lora_prompt_tokens", "Prompt tokens per adapter", ["model", "adapter"]
)
