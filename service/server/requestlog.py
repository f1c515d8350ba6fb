"""Request ids and the request log: one JSON line per finished request on stderr.

The middleware (service/server/guards.py) gives every request an id (the client's X-Request-Id when
it sends a sensible one) and a record in its ASGI scope; routes add what they know (tokens,
queue time, time to first token, finish reason) and the middleware writes the line once the
response has gone. Prompts are left out unless TAILORGPT_LOG_PROMPTS=1.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from starlette.types import Scope

from service.engine import RequestStats

SCOPE_KEY = "tailorgpt.request"
# Usage per API key, by the key's name (TAILORGPT_API_KEY_FILE's `name:key`), never the key.
KEY_REQUESTS = Counter(
    "tailorgpt_key_requests", "Requests per API key name and HTTP status", ["key", "status"]
)
KEY_TOKENS = Counter(
    "tailorgpt_key_tokens", "Prompt and completion tokens per API key name", ["key", "kind"]
)
CLIENT_ID = re.compile(r"[\w.:@/+=-]{1,128}")  # printable, short: it goes into logs and ids

log = logging.getLogger("tailorgpt.requests")
log.setLevel(logging.INFO)
log.propagate = False  # BentoML's logging setup does not print this logger's INFO lines
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(message)s"))
log.addHandler(_handler)


@dataclass
class RequestRecord:
    id: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    fields: dict[str, Any] = field(default_factory=dict)

    def count(self) -> None:
        """Add the request to its API key's usage (when it was made with one)."""
        key = self.fields.get("key")
        if key is None:
            return
        KEY_REQUESTS.labels(key=key, status=str(self.status)).inc()
        for kind in ("prompt", "completion"):
            if tokens := self.fields.get(f"{kind}_tokens"):
                KEY_TOKENS.labels(key=key, kind=kind).inc(tokens)

    def write(self) -> None:
        total = round(time.perf_counter() - self.started, 4)
        line = {"id": self.id, "route": self.route, "status": self.status, **self.fields}
        log.info(json.dumps(line | {"total_seconds": total}, ensure_ascii=False))


# The record of the request this task serves: /generate's requests are validated in their own
# HTTP request's task, then batched, so each takes its record with it (service.py).
CURRENT: ContextVar[RequestRecord | None] = ContextVar("tailorgpt_request", default=None)


def request_id(header: bytes | None) -> str:
    """The client's id when it is a sensible one, else a new one."""
    text = header.decode("latin-1") if header else ""
    return text if CLIENT_ID.fullmatch(text) else uuid.uuid4().hex


def record(scope: Scope) -> RequestRecord:
    """This request's record; a detached one where no middleware made it (unit tests)."""
    return scope.get(SCOPE_KEY) or RequestRecord(uuid.uuid4().hex, scope.get("path", ""))


def outcome(stats: list[RequestStats]) -> dict[str, Any]:
    """What the log says of a request's samples (one per choice)."""
    queued = [s.queue_seconds for s in stats if s.queue_seconds is not None]
    first = [s.ttft_seconds for s in stats if s.ttft_seconds is not None]
    reasons = [s.finish_reason for s in stats]
    return {
        "prompt_tokens": sum(s.prompt_tokens for s in stats if not s.sample),
        "completion_tokens": sum(s.completion_tokens for s in stats),
        "queue_seconds": round(max(queued), 4) if queued else None,
        "ttft_seconds": round(min(first), 4) if first else None,
        "finish_reason": reasons[0] if len(set(reasons)) == 1 else reasons,
    }


def log_event(event: str, **details: Any) -> None:
    """A line about the server rather than a request (an ignored field, say)."""
    log.info(json.dumps({"event": event, **details}, ensure_ascii=False))
