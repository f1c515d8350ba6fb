"""The chat playground page (GET /playground): a static page that streams from
/v1/chat/completions in the browser, for people who would rather talk to their model than
write JSON."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

PAGE = Path(__file__).with_name("playground.html")


def playground_app() -> Starlette:
    page = PAGE.read_text(encoding="utf-8")

    async def playground(_: Request) -> HTMLResponse:
        return HTMLResponse(page)

    return Starlette(routes=[Route("/", playground, methods=["GET"])])
