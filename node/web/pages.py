"""The console's pages and actions: one handler per route, each behind the session check.

Every page needs a signed-in user with the ``console`` permission (otherwise: a redirect to
/login); every POST needs a session and its CSRF token (otherwise: 403), and the review action
the ``review`` permission. Handlers that read the database run on Starlette's thread pool, each
in a connection of its own that is closed when the request ends.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from node.ops.audit import AuditLog
from node.pipeline.jobs import Job
from node.review.verdicts import JUDGEMENTS, NoSuchResult, record_judgement
from node.storage.objects import ObjectStore
from node.storage.registry import Registry
from node.web import queries, render
from node.web.auth import (
    CONSOLE,
    CSRF_FIELD,
    LOGIN_COOKIE,
    REVIEW,
    SESSION_COOKIE,
    Authenticator,
    Session,
    Sessions,
    csrf_ok,
)
from node.web.lineage import lineage_svg

log = logging.getLogger("modelnode.web")


@dataclass
class Console:
    """What the handlers share: the node's configuration, state, write lock, audit log and sessions."""

    config: Any
    db: Any
    store: ObjectStore
    registry: Registry
    audit: AuditLog
    write_lock: Any
    sessions: Sessions
    auth: Authenticator
    cache: render.ResultCache
    templates: Jinja2Templates
    secure_cookies: bool = False


def _console(request: Request) -> Console:
    return request.app.state.console


def _session(request: Request) -> Session | None:
    c = _console(request)
    s = c.sessions.get(request.cookies.get(SESSION_COOKIE))
    return s if s is not None and s.user.can(CONSOLE) else None


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


def page(handler: Callable[..., dict[str, Any] | Response]) -> Callable[[Request], Any]:
    """A GET page: the session check, a database connection, then ``handler(request, session)``.

    The handler returns a Response, or a (template name, context) pair as a dict with
    ``template``.
    """
    @functools.wraps(handler)
    def endpoint(request: Request) -> Response:
        session = _session(request)
        if session is None:
            return _to_login(request)
        c = _console(request)
        with c.db.connection_context():
            out = handler(request, session)
        if isinstance(out, Response):
            return out
        template = out.pop("template")
        return c.templates.TemplateResponse(request, template, {"session": session, "csrf_field": CSRF_FIELD, **out})
    return endpoint


async def _checked_form(request: Request, permission: str = CONSOLE) -> tuple[Session, Any]:
    """The form of a POST from a signed-in user with ``permission`` and the session's CSRF token."""
    session = _session(request)
    if session is None:
        raise HTTPException(403, "sign in first")
    form = await request.form()
    if not csrf_ok(session.csrf, form.get(CSRF_FIELD)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    if not session.user.can(permission):
        raise HTTPException(403, f"{session.user.name} may not do this (needs the {permission!r} permission)")
    return session, form


def _int(value: str | None, what: str, default: int | None = None) -> int:
    if value in (None, "") and default is not None:
        return default
    try:
        return int(value or "")
    except ValueError:
        raise HTTPException(400, f"{what} must be a whole number, got {value!r}") from None


def _job(job_id: int) -> Job:
    job = Job.get_or_none(Job.id == job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


# --------------------------------------------------------------------------- sign in and out


def login_form(request: Request) -> Response:
    c = _console(request)
    user = c.auth.from_proxy(request.headers, request.client.host if request.client else None)
    if user is not None:
        s = c.sessions.create(user, via_proxy=True)
        log.info("console: %s signed in through the proxy header", user.name)
        return _signed_in(request, s, request.query_params.get("next"))
    if _session(request) is not None:
        return RedirectResponse("/", status_code=303)
    return _login_page(request, "", 200)


def _login_page(request: Request, error: str, status: int) -> Response:
    c = _console(request)
    # Keep a token the browser already has: a second sign-in page (another tab, or a request
    # for a missing asset sent here) must not invalidate the form already on screen.
    token = request.cookies.get(LOGIN_COOKIE, "")
    if not 32 <= len(token) <= 64:
        token = secrets.token_urlsafe(32)
    resp = c.templates.TemplateResponse(request, "login.html", {
        "csrf": token, "csrf_field": CSRF_FIELD, "error": error, "next": request.query_params.get("next", ""),
        "session": None, "no_users": not c.auth.console_users()}, status_code=status)
    resp.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", secure=c.secure_cookies, path="/login")
    return resp


def _safe_next(target: str | None) -> str:
    # Only a path on this site: an absolute or scheme-relative URL would make the login an open redirect.
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _signed_in(request: Request, s: Session, target: str | None) -> Response:
    c = _console(request)
    resp = RedirectResponse(_safe_next(target), status_code=303)
    resp.set_cookie(SESSION_COOKIE, s.token, max_age=int(c.sessions.lifetime_s), httponly=True, samesite="strict",
                    secure=c.secure_cookies, path="/")
    resp.delete_cookie(LOGIN_COOKIE, path="/login")
    return resp


async def login(request: Request) -> Response:
    c = _console(request)
    form = await request.form()
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE, ""), form.get(CSRF_FIELD)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the sign-in page")
    username, passcode = str(form.get("username", "")).strip(), str(form.get("passcode", ""))
    user = await run_in_threadpool(c.auth.check_passcode, username, passcode)
    if user is None:
        # The user's name is no PHI, but a passcode typed into the name field would be: not logged.
        log.warning("console: failed sign-in from %s", request.client.host if request.client else "?")
        c.audit.record("console-login", outcome="failure", address=request.client.host if request.client else None)
        return _login_page(request, "Wrong username or passcode, or no console permission.", 401)
    s = c.sessions.create(user)
    log.info("console: %s signed in", user.name)
    c.audit.record("console-login", outcome="success", user=user.name,
                   address=request.client.host if request.client else None)
    return _signed_in(request, s, str(form.get("next", "")))


async def logout(request: Request) -> Response:
    session, _ = await _checked_form(request)
    _console(request).sessions.drop(session.token)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# --------------------------------------------------------------------------- pages


@page
def overview(request: Request, session: Session) -> dict[str, Any]:
    return {"template": "overview.html", "o": queries.overview(_console(request).config), "nav": "overview"}


@page
def models(request: Request, session: Session) -> dict[str, Any]:
    q = request.query_params
    filters = {k: q.get(k, "").strip() for k in ("modality", "anatomy", "finding")}
    return {"template": "models.html", "m": queries.model_list(_console(request).registry, **filters),
            "filters": filters, "nav": "models"}


@page
def model(request: Request, session: Session) -> dict[str, Any]:
    uid = request.path_params["uid"]
    record = _console(request).registry.get(uid)
    if record is None:
        raise HTTPException(404, f"no model {uid} in the registry")
    d = queries.model_detail(record)
    return {"template": "model.html", "d": d, "svg": lineage_svg(d["lineage"], record.uid), "nav": "models"}


@page
def jobs(request: Request, session: Session) -> dict[str, Any]:
    q = request.query_params
    state = q.get("state", "")
    if state and state not in queries.JOB_STATES:
        raise HTTPException(400, f"unknown state {state!r}; known: {', '.join(queries.JOB_STATES)}")
    filters = {"state": state, "model": q.get("model", ""), "outcome": q.get("outcome", "")}
    listing = queries.job_list(**filters, page=_int(q.get("page"), "page", 1))

    def page_url(n: int) -> str:
        return "/jobs?" + urlencode({**{k: v for k, v in filters.items() if v}, "page": n})
    return {"template": "jobs.html", "l": listing, "filters": filters, "states": queries.JOB_STATES,
            "page_url": page_url, "nav": "jobs"}


@page
def job(request: Request, session: Session) -> dict[str, Any]:
    j = _job(request.path_params["job_id"])
    return {"template": "job.html", "d": queries.job_detail(j), "nav": "jobs",
            "can_review": session.user.can(REVIEW), "judgements": JUDGEMENTS}


def _images(request: Request, job_id: int) -> render.ResultImages:
    c = _console(request)
    try:
        return c.cache.get(c.store, _job(job_id))
    except render.NothingToShow as exc:
        raise HTTPException(404, str(exc)) from exc
    except render.RenderError as exc:
        raise HTTPException(400, str(exc)) from exc


@page
def viewer(request: Request, session: Session) -> dict[str, Any]:
    job_id = request.path_params["job_id"]
    images = _images(request, job_id)
    q = request.query_params
    k = _int(q.get("k"), "slice", images.default_slice())
    if not 0 <= k < images.slices:
        raise HTTPException(400, f"slice {k} is outside 0-{images.slices - 1}")
    wl = q.get("wl") or images.default_window()
    if wl not in render.WINDOWS:
        raise HTTPException(400, f"unknown window {wl!r}; known: {', '.join(render.WINDOWS)}")
    try:
        shown = render.parse_segments(q.get("segments"), images)
    except render.RenderError as exc:
        raise HTTPException(400, str(exc)) from exc
    seg_param = ",".join(map(str, shown)) or "none"

    def url(**changes: Any) -> str:
        params = {"k": k, "wl": wl, "segments": seg_param, **changes}
        return f"/jobs/{job_id}/view?" + urlencode(params)

    def toggled(number: int) -> str:
        now = set(shown) ^ {number}
        return ",".join(map(str, sorted(now))) or "none"
    masked = set(images.slices_with_mask())
    return {"template": "viewer.html", "images": images, "k": k, "wl": wl, "shown": shown, "seg_param": seg_param,
            "url": url, "toggled": toggled, "masked": masked,
            # The presets are Hounsfield units: offered for CT only (a radiograph has its own window).
            "windows": list(render.WINDOWS) if images.modality == "CT" else ["auto"],
            "d": queries.job_detail(_job(job_id)), "can_review": session.user.can(REVIEW),
            "judgements": JUDGEMENTS, "nav": "jobs",
            "png": f"/jobs/{job_id}/slice/{k}.png?" + urlencode({"wl": wl, "segments": seg_param})}


@page
def slice_png(request: Request, session: Session) -> Response:
    job_id = request.path_params["job_id"]
    k = _int(request.path_params["k"], "slice")
    images = _images(request, job_id)
    q = request.query_params
    try:
        data = render.slice_png(images, k, window=q.get("wl") or images.default_window(),
                                segments=render.parse_segments(q.get("segments"), images))
    except render.RenderError as exc:
        raise HTTPException(400, str(exc)) from exc
    # Private: the pixels are patient data, never for a shared cache.
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@page
def workitems(request: Request, session: Session) -> dict[str, Any]:
    return {"template": "workitems.html", "items": queries.workitems(), "nav": "workitems"}


async def review(request: Request) -> Response:
    session, form = await _checked_form(request, REVIEW)
    job_id = request.path_params["job_id"]
    verdict, result_uid = str(form.get("verdict", "")), str(form.get("result_uid", ""))
    if verdict not in JUDGEMENTS:
        raise HTTPException(400, f"verdict must be one of {', '.join(JUDGEMENTS)}")
    c = _console(request)

    def record() -> None:
        with c.db.connection_context():
            j = _job(job_id)
            if result_uid not in j.result_uids():
                raise HTTPException(400, f"job {job_id} made no result {result_uid}")
            try:
                record_judgement(result_uid, verdict, reviewer=session.user.name, reason=str(form.get("reason", ""))[:1000],
                                 source="web", audit=c.audit, lock=c.write_lock)
            except NoSuchResult as exc:
                raise HTTPException(404, str(exc)) from exc
    await run_in_threadpool(record)
    log.info("console: %s %sed a result of job %d", session.user.name, verdict, job_id)
    back = _safe_next(str(form.get("back", "")) or f"/jobs/{job_id}")
    return RedirectResponse(back, status_code=303)


def error_page(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    c = _console(request)
    return c.templates.TemplateResponse(request, "error.html", {"status": status, "detail": detail,
                                                                "session": _session(request), "nav": ""},
                                        status_code=status)


def not_found(request: Request, exc: Exception) -> Response:
    # An unknown address without a session goes to the sign-in too: it reveals nothing.
    if _session(request) is None and request.method == "GET":
        return _to_login(request)
    return error_page(request, exc)
