"""The web console without a browser or a node process: Starlette's TestClient on a fresh data dir.

Sign-in, sessions, CSRF, roles, the proxy header, error statuses, paging, the review action,
the [web] configuration checks, the lineage picture and the overlay renderer.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings

import numpy as np
import pytest

from node.app import open_app
from node.config import ConfigError, parse_config
from node.security.identity import hash_passcode
from node.web import render
from node.web.lineage import lineage_svg

warnings.filterwarnings("ignore", message=".*httpx2.*")
from starlette.testclient import TestClient  # noqa: E402

pytestmark = pytest.mark.timeout(60)

USERS = [
    {"username": "rev", "passcode_hash": hash_passcode("pw-rev", iterations=1000), "permissions": ["console", "review"]},
    {"username": "ro", "passcode_hash": hash_passcode("pw-ro", iterations=1000), "permissions": ["console"]},
    {"username": "dicom", "passcode_hash": hash_passcode("pw-dicom", iterations=1000), "permissions": ["echo"]},
]
RESULT = "2.25.4242"


def _config(tmp_path, **web):
    return parse_config({"storage": {"data_dir": str(tmp_path / "data")}, "users": USERS,
                         "web": {"port": 0, **web}})


@pytest.fixture
def console(tmp_path):
    from node.pipeline.jobs import Job
    from node.web.app import build_app

    cfg = _config(tmp_path)
    state = open_app(cfg)
    Job.create(group_key="2.25.1", state="done", outcome="result", model_uid="2.25.7", model_name="m",
               results=json.dumps([RESULT]), timings=json.dumps({"select": 0.01, "store_result": 0.02, "total": 0.1}))
    for i in range(119):
        Job.create(group_key=f"2.25.{i + 100}", state="failed" if i % 2 else "exported", error="boom" if i % 2 else "")
    app = build_app(cfg, state.db, state.store, state.registry, write_lock=threading.Lock())
    yield cfg, state, app
    state.close()


def _client(app, **kw) -> TestClient:
    return TestClient(app, follow_redirects=False, **kw)


def _sign_in(client: TestClient, user: str, passcode: str, next_: str = "") -> object:
    client.get("/login")
    return client.post("/login", data={"username": user, "passcode": passcode, "next": next_,
                                       "csrf": client.cookies.get("modelnode_login")})


def _csrf(html: str) -> str:
    return html.split('name="csrf" value="')[1].split('"')[0]


def test_every_page_redirects_to_the_login_without_a_session(console):
    _, _, app = console
    c = _client(app)
    for path in ("/", "/jobs", "/jobs/1", "/jobs/1/view", "/jobs/1/slice/0.png", "/models", "/models/x", "/workitems",
                 "/nowhere"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    assert c.get("/login").status_code == 200
    assert c.get("/static/console.css").status_code == 200
    assert c.post("/jobs/1/review", data={"verdict": "accept", "result_uid": RESULT}).status_code == 403


def test_sign_in_checks_the_passcode_the_token_and_the_console_permission(console):
    _, _, app = console
    c = _client(app)
    assert _sign_in(c, "rev", "wrong").status_code == 401
    assert _sign_in(c, "nobody", "pw").status_code == 401
    assert _sign_in(c, "dicom", "pw-dicom").status_code == 401  # a DICOM user without "console"
    c.get("/login")
    assert c.post("/login", data={"username": "rev", "passcode": "pw-rev"}).status_code == 403  # no token
    r = _sign_in(c, "rev", "pw-rev", next_="//evil.example/x")
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert c.get("/").status_code == 200
    r = c.post("/logout", data={"csrf": _csrf(c.get("/").text)})
    assert r.status_code == 303 and c.get("/").status_code == 303


def test_errors_have_their_status(console):
    _, _, app = console
    c = _client(app)
    _sign_in(c, "ro", "pw-ro")
    assert c.get("/jobs/99999").status_code == 404
    assert c.get("/models/2.25.0").status_code == 404
    assert c.get("/jobs?state=bogus").status_code == 400
    assert c.get("/jobs?page=x").status_code == 400
    assert c.get("/jobs/2/view").status_code == 404  # a job without images
    r = c.get("/jobs")
    assert r.status_code == 200 and r.text.count('class="job"') == 50 and "page 1 of 3" in r.text
    assert c.get("/jobs?page=3").text.count('class="job"') == 20
    assert c.get("/jobs?state=failed").text.count('class="job"') == 50
    assert "x-frame-options" in r.headers and "content-security-policy" in r.headers


def test_review_is_recorded_like_the_cli_and_needs_the_review_role(console, tmp_path):
    cfg, _, app = console
    from node.review.verdicts import Verdict

    ro = _client(app)
    _sign_in(ro, "ro", "pw-ro")
    token = _csrf(ro.get("/jobs/1").text)
    form = {"verdict": "accept", "result_uid": RESULT}
    assert ro.post("/jobs/1/review", data={**form, "csrf": token}).status_code == 403
    rev = _client(app)
    _sign_in(rev, "rev", "pw-rev")
    token = _csrf(rev.get("/jobs/1").text)
    assert rev.post("/jobs/1/review", data=form).status_code == 403
    assert rev.post("/jobs/1/review", data={**form, "csrf": token, "result_uid": "2.25.9"}).status_code == 400
    assert rev.post("/jobs/1/review", data={**form, "csrf": token, "verdict": "maybe"}).status_code == 400
    r = rev.post("/jobs/1/review", data={**form, "csrf": token, "reason": "fine"})
    assert r.status_code == 303 and r.headers["location"] == "/jobs/1"
    [row] = list(Verdict.select())
    assert (row.kind, row.state, row.reviewer, row.result_uid, row.job_id, row.reason) == \
        ("accept", "linked", "rev", RESULT, 1, "fine")
    audit = [json.loads(line) for line in cfg.audit_path.read_text().splitlines()]
    [v] = [a for a in audit if a["event"] == "verdict"]
    assert v["reviewer"] == "rev" and v["source"] == "web" and v["result_uid"] == RESULT


def test_record_judgement_refuses_unknown_results(console):
    from node.review.verdicts import NoSuchResult, record_judgement

    with pytest.raises(NoSuchResult):
        record_judgement("2.25.42", "accept")  # a prefix of RESULT, not a result
    with pytest.raises(ValueError, match="accept, reject"):
        record_judgement(RESULT, "correction")


def test_a_trusted_proxy_header_signs_in(tmp_path):
    from node.web.app import build_app

    cfg = _config(tmp_path, proxy_user_header="X-Remote-User")
    state = open_app(cfg)
    try:
        app = build_app(cfg, state.db, state.store, state.registry, write_lock=threading.Lock())
        trusted = _client(app, client=("127.0.0.1", 5000))
        r = trusted.get("/login", headers={"X-Remote-User": "ro"})
        assert r.status_code == 303 and trusted.get("/").status_code == 200
        untrusted = _client(app, client=("10.1.2.3", 5000))
        assert untrusted.get("/login", headers={"X-Remote-User": "ro"}).status_code == 200  # the form
        assert untrusted.get("/").status_code == 303
        nobody = _client(app, client=("127.0.0.1", 5000))
        assert nobody.get("/login", headers={"X-Remote-User": "dicom"}).status_code == 200
    finally:
        state.close()


def test_web_configuration_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="web.bind.*tls.certificate"):
        parse_config({"web": {"bind": "0.0.0.0"}})
    with pytest.raises(ConfigError, match="web.port"):
        parse_config({"web": {"port": 11112}})
    with pytest.raises(ConfigError, match="web.session_minutes"):
        parse_config({"web": {"session_minutes": 0}})
    with pytest.raises(ConfigError, match="web.proxy_user_header"):
        parse_config({"web": {"proxy_user_header": "X Remote"}})
    with pytest.raises(ConfigError, match="unknown permission 'consol'"):
        parse_config({"users": [{**USERS[0], "permissions": ["consol"]}]})
    with pytest.raises(ConfigError, match="peers\\[0\\].permissions"):
        parse_config({"peers": [{"ae_title": "A", "host": "h", "port": 104, "permissions": ["console"]}]})
    assert parse_config({}).web.port == 11180


def test_lineage_svg_links_parent_and_child():
    gens = [[{"uid": "2.25.1", "name": "m", "version": "1", "parent": ""}],
            [{"uid": "2.25.2", "name": "m", "version": "2", "parent": "2.25.1"}]]
    svg = lineage_svg(gens, "2.25.2")
    assert svg.count("<rect") == 2 and 'class="edge"' in svg and 'class="box current"' in svg
    assert 'href="/models/2.25.1"' in svg
    assert "&lt;" in lineage_svg([[{"uid": "2.25.3", "name": "<x>", "version": "1", "parent": ""}]], "")


def _images() -> render.ResultImages:
    pixels = np.full((3, 8, 8), -1000.0, np.float32)
    pixels[:, 2:6, 2:6] = 40.0
    mask = np.zeros((3, 8, 8), bool)
    mask[1, 3:5, 3:5] = True
    return render.ResultImages(job_id=1, series_uid="2.25.1", modality="CT", pixels=pixels, uids=["a", "b", "c"],
                               monochrome1=False, header_window=None,
                               segments=[render.Segment(1, "lung", "Lung", (255, 0, 0))], masks={1: mask})


def test_render_draws_segments_in_their_colour_and_refuses_bad_requests():
    images = _images()
    rgb = render.render_slice(images, 1, window="soft")
    assert tuple(rgb[3, 3]) == (255, 0, 0)  # the border is opaque
    assert tuple(rgb[0, 0]) == (0, 0, 0)  # air in a soft-tissue window
    assert (render.render_slice(images, 1, window="soft", segments=[]) == rgb[0, 0]).all(axis=2).sum() > 0
    assert images.slices_with_mask() == [1] and images.default_slice() == 1
    for bad in (lambda: render.render_slice(images, 3), lambda: render.render_slice(images, -1),
                lambda: render.render_slice(images, 0, window="mediastinum"),
                lambda: render.parse_segments("1,x", images), lambda: render.parse_segments("2", images)):
        with pytest.raises(render.RenderError):
            bad()
    assert render.slice_png(images, 1)[:8] == b"\x89PNG\r\n\x1a\n"
    assert render.montage_png(images)[:4] == b"\x89PNG"


def test_segment_colour_comes_from_the_cielab_value():
    import highdicom as hd
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RecommendedDisplayCIELabValue = list(hd.color.CIELabColor.from_rgb(0, 128, 255).value)
    r, g, b = render._colour(item, 1)
    assert abs(r - 0) <= 2 and abs(g - 128) <= 2 and abs(b - 255) <= 2
    assert render._colour(Dataset(), 2) == render.FALLBACK_COLOURS[1]


def test_server_beyond_loopback_speaks_https_with_the_nodes_tls_files(tmp_path):
    import httpx
    from certs import make_pki

    from node.web.server import WebBindError, WebServer

    pki = make_pki(tmp_path / "pki")
    cfg = parse_config({"storage": {"data_dir": str(tmp_path / "data")}, "users": USERS,
                        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key)},
                        "web": {"bind": "0.0.0.0", "port": 0}})
    state = open_app(cfg)
    server = WebServer(cfg, state, threading.Lock())
    server.start()
    try:
        assert server.tls and server.url.startswith("https://")
        with httpx.Client(verify=False, timeout=10) as client:  # a CA made for this test only
            r = client.get(f"https://127.0.0.1:{server.port}/login")
            assert r.status_code == 200 and "Secure" in r.headers["set-cookie"]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{server.port}/login", timeout=5)
        # The same port again: a clear error naming the address, not a thread that ends quietly.
        taken = parse_config({"storage": {"data_dir": str(tmp_path / "data")}, "web": {"port": server.port}})
        with pytest.raises(WebBindError, match=f"127.0.0.1:{server.port}"):
            WebServer(taken, state, threading.Lock()).start()
    finally:
        server.stop()
        state.close()


def test_sr_findings_leave_out_the_report_context():
    from pydicom.dataset import Dataset

    def item(name: str, vt: str, **kw) -> Dataset:
        ds = Dataset()
        code = Dataset()
        code.CodeMeaning = name
        ds.ConceptNameCodeSequence = [code]
        ds.ValueType = vt
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    finding = Dataset()
    finding.CodeMeaning = "Chest"
    group = item("Measurement Group", "CONTAINER", ContentSequence=[
        item("Algorithm Name", "TEXT", TextValue="m"), item("Finding", "CODE", ConceptCodeSequence=[finding])])
    sr = Dataset()
    sr.ContentSequence = [item("Observer Type", "CODE", ConceptCodeSequence=[finding]), group]
    assert render._findings(sr) == [(0, "Measurement Group", ""), (1, "Finding", "Chest")]


@pytest.mark.timeout(30)
def test_a_console_nobody_can_sign_in_to_says_so_at_start(tmp_path, caplog):
    from node.web.server import WebServer

    for users, warned in (([], True), (USERS, False)):
        cfg = parse_config({"storage": {"data_dir": str(tmp_path / "data")}, "users": users, "web": {"port": 0}})
        state = open_app(cfg)
        server = WebServer(cfg, state, threading.Lock())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modelnode.web"):
            server.start()
        try:
            said = [r.getMessage() for r in caplog.records if r.name == "modelnode.web"]
            assert any("nobody can sign in" in m for m in said) is warned, said
        finally:
            server.stop()
            state.close()
