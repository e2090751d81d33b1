"""The console's ASGI application: routes, templates, static files and the request log.

:func:`build_app` wires :mod:`node.web.pages` to their addresses. The request log is the node's
own (``modelnode.web``): method, path and status, never the query string (uvicorn's access log
is off because it prints it). Every response carries headers that keep the pages out of frames
and caches and allow only the node's own scripts, styles and images.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from node.ops.audit import AuditLog
from node.web import pages, render
from node.web.auth import Authenticator, Sessions

log = logging.getLogger("modelnode.web")
HERE = Path(__file__).resolve().parent

SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; style-src-attr 'unsafe-inline'; script-src 'self'; form-action 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'"),
]


class RequestLog:
    """ASGI middleware: one log line per request (no query string, no PHI) and the security headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            path = scope.get("path", "")
            # Slices and static files would drown the log while someone scrolls: debug level.
            level = logging.DEBUG if path.startswith("/static/") or path.endswith(".png") else logging.INFO
            log.log(level, "%s %s %d %.0f ms", scope.get("method", ""), path, status[0],
                    1000 * (time.perf_counter() - start))


def routes() -> list[Any]:
    return [
        Route("/login", pages.login_form, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/", pages.overview, methods=["GET"]),
        Route("/models", pages.models, methods=["GET"]),
        Route("/models/{uid}", pages.model, methods=["GET"]),
        Route("/jobs", pages.jobs, methods=["GET"]),
        Route("/jobs/{job_id:int}", pages.job, methods=["GET"]),
        Route("/jobs/{job_id:int}/view", pages.viewer, methods=["GET"]),
        Route("/jobs/{job_id:int}/slice/{k}.png", pages.slice_png, methods=["GET"]),
        Route("/jobs/{job_id:int}/review", pages.review, methods=["POST"]),
        Route("/workitems", pages.workitems, methods=["GET"]),
        Route("/favicon.ico", lambda request: RedirectResponse("/static/favicon.svg", status_code=301)),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]


def build_app(config: Any, db: Any, store: Any, registry: Any, *, write_lock: Any, audit: AuditLog | None = None,
              secure_cookies: bool = False) -> Starlette:
    """The console for a node's state (``node.app.App``'s db, store and registry) and write lock."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["title"] = config.node.ae_title
    console = pages.Console(
        config=config, db=db, store=store, registry=registry, audit=audit or AuditLog.from_config(config),
        write_lock=write_lock, sessions=Sessions(config.web.session_minutes * 60), auth=Authenticator(config),
        cache=render.ResultCache(), templates=templates, secure_cookies=secure_cookies)
    app = Starlette(routes=routes(), exception_handlers={404: pages.not_found, HTTPException: pages.error_page})
    app.state.console = console
    app.add_middleware(RequestLog)
    return app
