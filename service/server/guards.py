"""ASGI middleware in front of every route: request ids and the request log, API keys, a full
queue for /generate, a bound on request bodies, and a drain on SIGTERM.

Request ids: X-Request-Id is taken from the client (a new one when absent) and returned; each
request to /v1 or /generate ends with one JSON log line (service/server/requestlog.py).

API keys: with keys set, /v1/*, /generate and the token tools need `Authorization: Bearer KEY`
(else an OpenAI-shaped 401); probes, metrics and the docs stay open. Keys are compared in
constant time and never logged: the request log line and the per-key metrics
(tailorgpt_key_requests_total, tailorgpt_key_tokens_total) name a key by its name.

/generate: BentoML merges concurrent calls into one batch, so a full queue is checked here,
per call, as it arrives: the one that does not fit gets 503, not the others of its batch.

Bodies: one over `max_body` bytes gets 413 before it is read, by its Content-Length; a chunked
one as soon as what has come passes the bound. Nothing else bounds them: uvicorn reads any size.
After the 413 the rest of the body is read and discarded (a bounded amount, DISCARD_BYTES) and
the connection closed, so clients that send their whole body first read the 413.
Every route takes JSON: a multipart body gets 415.

Drain: on SIGTERM BentoML's arbiter signals every worker, where uvicorn would at once stop
accepting (new clients then hang in the listen backlog, unanswered) and wait for the requests
it has. Instead the worker keeps answering: new requests and /readyz get 503 with Retry-After,
/livez and /metrics still answer, the requests already running finish, and once none is left,
or the grace period is over, uvicorn's own shutdown runs and the server exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
from collections.abc import Callable
from types import FrameType

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import QueueFull
from service.server.protocol import RETRY_AFTER_SECONDS, busy, error, no_route
from service.server.requestlog import CURRENT, SCOPE_KEY, RequestRecord, request_id

# A body over the limit is answered at once, then read and thrown away up to these bounds.
DISCARD_BYTES = 64 * 2**20
DISCARD_SECONDS = 30.0
ANSWERED_WHILE_DRAINING = {"/livez", "/healthz", "/metrics"}
GENERATE = "/generate"
TOKEN_TOOLS = {"/tokenize", "/detokenize"}  # vLLM's: they run the tokenizer, as a request does


def generation_route(path: str) -> bool:
    """A route that needs the API key, gets a request id and a log line."""
    return path == GENERATE or path in TOKEN_TOOLS or path == "/v1" or path.startswith("/v1/")


class Drain:
    """One worker's drain: whether it has begun, and how many requests are running."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.draining = False
        self.running = 0
        self.task: asyncio.Task[None] | None = None

    def take_over_sigterm(self) -> None:
        """Call from the server's event loop once uvicorn has set its signal handlers (a
        BentoML startup hook): SIGTERM starts the drain, and uvicorn's handler runs after it."""
        loop = asyncio.get_running_loop()
        uvicorn_exit = signal.getsignal(signal.SIGTERM)

        def on_sigterm(sig: int, frame: FrameType | None) -> None:
            if not self.draining:
                self.draining = True
                loop.call_soon_threadsafe(self._start, lambda: uvicorn_exit(sig, frame))

        signal.signal(signal.SIGTERM, on_sigterm)

    def _start(self, then: Callable[[], None]) -> None:
        self.task = asyncio.ensure_future(self._drain(then))

    async def _drain(self, then: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_seconds
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        then()


class BodyTooLarge(Exception):
    pass


class Guards:
    def __init__(
        self,
        app: ASGIApp,
        drain: Drain,
        max_body: int,
        api_keys: dict[str, str] | None = None,
        queue_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.drain = drain
        self.max_body = max_body
        self.api_keys = [(name, key.encode()) for name, key in (api_keys or {}).items()]
        self.queue_full = queue_full  # for /generate: the engine's queue has no room

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not generation_route(scope["path"]):
            return await self._guarded(scope, receive, send)
        headers = dict(scope["headers"])
        log = RequestRecord(request_id(headers.get(b"x-request-id")), scope["path"])
        scope[SCOPE_KEY] = log
        CURRENT.set(log)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                log.status = message["status"]
                id_header = (b"x-request-id", log.id.encode())
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_id)
        finally:
            log.count()
            log.write()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and scope["path"] not in ANSWERED_WHILE_DRAINING:
            return await shutting_down()(scope, receive, send)
        headers = dict(scope["headers"])
        if generation_route(scope["path"]):
            if (key := self._key_name(headers)) is False:
                return await unauthorized()(scope, receive, send)
            if key is not None and SCOPE_KEY in scope:
                scope[SCOPE_KEY].fields["key"] = key
        if scope["path"].startswith("/v1/") and not scope["path"].isprintable():
            # No route or mount of Starlette matches a newline in a path: without this it
            # would get the framework's plain-text 404 rather than OpenAI's.
            return await (await no_route(Request(scope)))(scope, receive, send)
        if scope["path"] == GENERATE and self.queue_full():
            return await busy(QueueFull("the queue is full"))(scope, receive, send)
        if headers.get(b"content-type", b"").startswith(b"multipart/"):
            # BentoML would parse it as a form (500 without a boundary); no route takes forms.
            return await error(
                415,
                "send the body as JSON (Content-Type: application/json)",
                "invalid_request_error",
            )(scope, receive, send)
        declared = headers.get(b"content-length")
        try:
            if declared is not None and int(declared) > self.max_body:
                raise BodyTooLarge
            receive = await self._buffered(receive)
        except BodyTooLarge:
            return await self._refuse_too_large(receive, send)
        self.drain.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.running -= 1

    def _key_name(self, headers: dict[bytes, bytes]) -> str | bool | None:
        """The name of the key the request was made with; None when no key is needed;
        False when one is needed and it has not got it."""
        if not self.api_keys:
            return None
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        # Every key compared, each in constant time: the time says nothing of which is near.
        matches = [name for name, key in self.api_keys if hmac.compare_digest(given.strip(), key)]
        return matches[0] if scheme.lower() == b"bearer" and matches else False

    async def _buffered(self, receive: Receive) -> Receive:
        """The whole body read here, within the bound, and handed on as one message; later
        messages (a disconnect) come from the server as before."""
        message = await receive()
        body = bytearray(message.get("body", b""))
        while message.get("more_body", False):
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_body:
                raise BodyTooLarge
        first: list[Message] = [{**message, "body": bytes(body), "more_body": False}]

        async def replay() -> Message:
            return first.pop() if first else await receive()

        return replay

    async def _refuse_too_large(self, receive: Receive, send: Send) -> None:
        """413, then the rest of the body read and discarded (up to DISCARD_BYTES, for up to
        DISCARD_SECONDS) before the response ends and the connection closes. A client sends
        its whole body before it reads the answer (requests, httpx, urllib): closed with its
        body unread, the connection would be reset under it and the 413 never read."""
        response = self._too_large()
        headers = [*response.raw_headers, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_discard(receive), DISCARD_SECONDS)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _too_large(self) -> JSONResponse:
        message = (
            f"the request body is over this server's limit of {self.max_body} bytes: send "
            "fewer or shorter prompts (the limit is TAILORGPT_MAX_BODY_BYTES)"
        )
        return error(413, message, "invalid_request_error")


async def _discard(receive: Receive) -> None:
    """Read what is left of a request body, up to DISCARD_BYTES."""
    read = 0
    while read < DISCARD_BYTES:
        message = await receive()
        read += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def shutting_down() -> JSONResponse:
    return error(
        503,
        f"the server is shutting down: retry after {RETRY_AFTER_SECONDS}s, another replica "
        "or its replacement will answer",
        "server_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def unauthorized() -> JSONResponse:
    return error(
        401,
        "missing or wrong API key: send the header 'Authorization: Bearer KEY' with a key "
        "this server was given (TAILORGPT_API_KEY or TAILORGPT_API_KEY_FILE)",
        "invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
