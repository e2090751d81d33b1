"""The web console in a real browser: Debian's chromium through Selenium, against a real node.

One node (the shipped reference models, the console on a free port, one reviewer) receives a
phantom chest CT by dcmtk's storescu and makes a lung SEG; one headless chromium then signs in
and reads the pages, the overlay PNG is checked against the phantom's lung truth, and an accept
click must become a verdict row and an audit line. Everything waits on events (an element, a
row in the node's database), never on a fixed time.

``MODELNODE_CONSOLE_SCREENSHOTS=1`` also writes a screenshot of each page to docs/console/
(the pictures in docs/console.md).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from node_proc import NodeProcess, query
from peers import require, run
from PIL import Image

from models.training.phantoms import ct_truth, write_ct_series, write_radiograph
from node.security.identity import hash_passcode

pytestmark = [pytest.mark.peers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "console"
LUNG = ROOT / "models" / "reference" / "lung_unet.dcm"
CT_SEED, CT_SLICES = 9001, 24
REVIEWER, PASSCODE = "doe.jane", "lungs-are-pink"
READER, READER_PASSCODE = "ro.reader", "look-only"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags for a test browser: no GPU, no QUIC, no first-run dialogs, no background traffic.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _wait(predicate, timeout: float, what: str, node: NodeProcess | None = None):
    """Poll state that lives in another process (the node's database)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"\n{node.log()[-4000:]}" if node else ""))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require("storescu")
    workdir = tmp_path_factory.mktemp("console")
    # 1,000 PBKDF2 iterations (the least the configuration takes): a sign-in in a millisecond.
    users = [{"username": REVIEWER, "passcode_hash": hash_passcode(PASSCODE, iterations=1000),
              "permissions": ["console", "review"]},
             {"username": READER, "passcode_hash": hash_passcode(READER_PASSCODE, iterations=1000),
              "permissions": ["console"]}]
    extra = {"pipeline": {"quiet_seconds": 0.5, "poll_seconds": 0.1}, "inference": {"intra_op_threads": 2}}
    n = NodeProcess.start(workdir, reference_models=True, web=True, users=users, extra=extra)
    try:
        ct = write_ct_series(workdir / "ct", CT_SEED, slices=CT_SLICES)
        run(["storescu", "-aec", n.ae_title, "127.0.0.1", str(n.port), *map(str, ct)], timeout=120)
        # A chest radiograph too: its job makes an SR, whose findings the viewer shows.
        xr = write_radiograph(workdir / "xr" / "chest.dcm", 4711, "chest", modality="DX")
        run(["storescu", "-aec", n.ae_title, "127.0.0.1", str(n.port), str(xr)], timeout=60)
        _wait(lambda: len(query(n, "SELECT id FROM job WHERE state IN ('done', 'exported') AND results != '[]'")) == 2,
              120, "the SEG and SR jobs", n)
        _add_derived_version(n, workdir / "lung_1.1.0.dcm")
        yield n
    finally:
        n.stop()


def _add_derived_version(node: NodeProcess, path: Path) -> None:
    """A version 1.1.0 of the lung model naming 1.0.0 as its parent: the lineage has two boxes.

    Added after the jobs ran, so that it takes no part in their selection.
    """
    from iods import model_object as mo

    ds = mo.read_file(LUNG)
    onnx, card = mo.decode(ds)
    card = replace(card, identity=replace(card.identity, version="1.1.0", uid=""),
                   provenance=replace(card.provenance, parent_uid=str(ds.SOPInstanceUID)))
    mo.write(mo.encode(onnx, card), path)
    res = node.cli("models", "add", str(path))
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def browser(node, tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(node.web_url + "/login")
        driver.find_element("id", "username").send_keys(REVIEWER)
        driver.find_element("id", "passcode").send_keys(PASSCODE)
        driver.find_element("id", "sign-in").click()
        _element(driver, "id", "queue-depth")
        yield driver
    finally:
        driver.quit()


def _element(driver, by: str, value: str, timeout: float = 10):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.presence_of_element_located((by, value)))


def _shot(driver, name: str) -> None:
    if os.environ.get("MODELNODE_CONSOLE_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _job_id(node: NodeProcess, model: str = "modelnode-lung-unet") -> int:
    [(job_id,)] = query(node, "SELECT id FROM job WHERE results != '[]' AND model_name = ?", model)
    return job_id


@contextmanager
def _signed_in_client(node: NodeProcess, user: str, passcode: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node.web_url, timeout=10) as client:
        client.get("/login")
        r = client.post("/login", data={"username": user, "passcode": passcode,
                                         "csrf": client.cookies["modelnode_login"]})
        assert r.status_code == 303, r.text
        yield client


@pytest.mark.timeout(60)
def test_overview_shows_the_job(node, browser):
    browser.get(node.web_url + "/")
    row = _element(browser, "css selector", f"tr.job[data-job='{_job_id(node)}']")
    assert "modelnode-lung-unet" in row.text
    assert browser.find_element("id", "user").text == REVIEWER
    assert int(browser.find_element("id", "instances-hour").text) >= CT_SLICES
    _shot(browser, "overview")


@pytest.mark.timeout(60)
def test_job_page_shows_the_selection_explanation(node, browser):
    job_id = _job_id(node)
    browser.get(f"{node.web_url}/jobs/{job_id}")
    selection = _element(browser, "id", "selection")
    assert "modelnode-lung-unet" in selection.text and "chosen" in selection.text
    assert "anatomy" in selection.text and "BodyPartExamined" in selection.text
    assert "CR/DX" in selection.text  # the radiograph model, rejected with its reason
    assert "stored" in browser.find_element("id", "timeline").text
    _shot(browser, "job")
    browser.get(f"{node.web_url}/jobs")
    _element(browser, "css selector", f"tr.job[data-job='{job_id}']")
    _shot(browser, "jobs")


@pytest.mark.timeout(60)
def test_viewer_overlay_falls_inside_the_lung_truth(node, browser):
    job_id = _job_id(node)
    browser.get(f"{node.web_url}/jobs/{job_id}/view")
    img = _element(browser, "id", "slice")
    src = img.get_attribute("src")
    k = int(src.split("/slice/")[1].split(".png")[0])
    cookie = browser.get_cookie("modelnode_session")
    with httpx.Client(base_url=node.web_url, cookies={"modelnode_session": cookie["value"]}, timeout=10) as client:
        r = client.get(src.removeprefix(node.web_url))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        rgb = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
        plain = client.get(f"/jobs/{job_id}/slice/{k}.png?wl=lung&segments=none")
        assert client.get(f"/jobs/{job_id}/slice/{CT_SLICES}.png").status_code == 400
        assert client.get(f"/jobs/{job_id + 1000}/view").status_code == 404
    coloured = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
    # Slices sort along +z, the phantom's instance order (index 0 most inferior).
    lung = ct_truth(CT_SEED, slices=CT_SLICES).lung[k]
    assert coloured.sum() > 500, "no overlay on the middle segmented slice"
    inside = (coloured & lung).sum() / coloured.sum()
    assert inside >= 0.95, f"only {inside:.3f} of the overlay's pixels lie in the lung truth"
    assert (coloured & lung).sum() / lung.sum() >= 0.8, "the overlay misses most of the lung"
    # The lung segment's colour is the SEG's RecommendedDisplayCIELabValue: a red, not a grey.
    mean = rgb[coloured].mean(axis=0)
    assert mean[0] > mean[1] + 30, mean
    grey = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")).astype(int)
    assert not ((grey[..., 0] != grey[..., 1]) | (grey[..., 1] != grey[..., 2])).any(), "segments=none still coloured"
    _shot(browser, "viewer")


@pytest.mark.timeout(60)
def test_viewer_shows_the_sr_findings_beside_the_radiograph(node, browser):
    browser.get(f"{node.web_url}/jobs/{_job_id(node, 'modelnode-bodypart-cnn')}/view")
    findings = _element(browser, "id", "findings").text
    assert "Finding: Chest" in findings and "Present" in findings
    assert "Device Observer" not in findings
    from selenium.webdriver.support.ui import WebDriverWait

    img = browser.find_element("id", "slice")
    WebDriverWait(browser, 10).until(lambda _: int(img.get_attribute("naturalWidth") or 0) > 0)  # the PNG decoded
    _shot(browser, "viewer-sr")


@pytest.mark.timeout(60)
def test_accept_click_is_stored_as_a_verdict_and_audited(node, browser):
    job_id = _job_id(node)
    browser.get(f"{node.web_url}/jobs/{job_id}/view")
    _element(browser, "id", "accept-1").click()
    shown = _element(browser, "css selector", "p.verdict.accept")
    assert REVIEWER in shown.text
    [(result_uids,)] = query(node, "SELECT results FROM job WHERE id = ?", job_id)
    rows = query(node, "SELECT kind, state, reviewer, result_uid, job_id FROM verdict")
    assert rows == [("accept", "linked", REVIEWER, json.loads(result_uids)[0], job_id)]
    audit = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
    verdicts = [a for a in audit if a["event"] == "verdict"]
    assert len(verdicts) == 1 and verdicts[0]["reviewer"] == REVIEWER and verdicts[0]["source"] == "web"
    [(model_uid,)] = query(node, "SELECT model_uid FROM job WHERE id = ?", job_id)
    browser.get(f"{node.web_url}/models/{model_uid}")
    assert _element(browser, "id", "accepted").text == "1"
    lineage = browser.find_element("css selector", "svg.lineage")
    assert len(lineage.find_elements("css selector", "rect")) == 2  # 1.0.0 and the derived 1.1.0
    assert lineage.find_elements("css selector", "path.edge")
    _shot(browser, "model")
    browser.get(f"{node.web_url}/models")
    _element(browser, "css selector", "table.models")
    _shot(browser, "models")
    browser.get(f"{node.web_url}/workitems")
    _element(browser, "css selector", "table.workitems")
    _shot(browser, "workitems")


@pytest.mark.timeout(60)
def test_without_a_session_every_page_but_login_redirects(node, browser):
    job_id = _job_id(node)
    pages = ["/", "/models", "/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/view", f"/jobs/{job_id}/slice/0.png",
             "/workitems", "/models/2.25.1", "/no-such-page"]
    with httpx.Client(base_url=node.web_url, timeout=10) as anonymous:
        for page in pages:
            r = anonymous.get(page)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), (page, r.status_code)
        assert anonymous.get("/login").status_code == 200
        assert anonymous.get("/static/console.css").status_code == 200
    # And in the browser, with a fresh profile's worth of nothing: its session cookie removed.
    browser.delete_cookie("modelnode_session")
    try:
        browser.get(f"{node.web_url}/jobs/{job_id}")
        _element(browser, "id", "sign-in")
        assert "/login?next=" in browser.current_url
        _shot(browser, "login")
    finally:
        browser.get(node.web_url + "/login")
        browser.find_element("id", "username").send_keys(REVIEWER)
        browser.find_element("id", "passcode").send_keys(PASSCODE)
        browser.find_element("id", "sign-in").click()
        _element(browser, "id", "queue-depth")


@pytest.mark.timeout(60)
def test_an_action_without_a_csrf_token_is_refused(node):
    job_id = _job_id(node)
    [(results,)] = query(node, "SELECT results FROM job WHERE id = ?", job_id)
    form = {"verdict": "reject", "result_uid": json.loads(results)[0]}
    before = query(node, "SELECT COUNT(*) FROM verdict")
    with _signed_in_client(node, REVIEWER, PASSCODE) as client:
        assert client.post(f"/jobs/{job_id}/review", data=form).status_code == 403
        assert client.post(f"/jobs/{job_id}/review", data={**form, "csrf": "forged"}).status_code == 403
        assert client.post("/logout", data={}).status_code == 403
    with httpx.Client(base_url=node.web_url, timeout=10) as anonymous:
        assert anonymous.post(f"/jobs/{job_id}/review", data=form).status_code == 403
        # The sign-in form is protected too: a POST without the token from its page.
        assert anonymous.post("/login", data={"username": REVIEWER, "passcode": PASSCODE}).status_code == 403
    # A read-only user with a good token still may not judge.
    with _signed_in_client(node, READER, READER_PASSCODE) as client:
        page = client.get(f"/jobs/{job_id}").text
        assert "accept-1" not in page
        token = page.split('name="csrf" value="')[1].split('"')[0]
        assert client.post(f"/jobs/{job_id}/review", data={**form, "csrf": token}).status_code == 403
    assert query(node, "SELECT COUNT(*) FROM verdict") == before


@pytest.mark.timeout(60)
def test_jobs_show_png_writes_the_montage(node, tmp_path):
    out = tmp_path / "montage.png"
    res = node.cli("jobs", "show", str(_job_id(node)), "--png", str(out))
    assert res.returncode == 0, res.stderr
    im = Image.open(out)
    assert im.format == "PNG" and im.width >= 512
    rgb = np.asarray(im.convert("RGB")).astype(int)
    assert ((rgb[..., 0] - rgb[..., 1]) > 30).sum() > 1000  # the lung's red on the tiles
    missing = node.cli("jobs", "show", "9999", "--png", str(tmp_path / "none.png"))
    assert missing.returncode != 0 and "no job 9999" in missing.stderr


@pytest.mark.timeout(10)
def test_screenshots_are_in_the_docs():
    """docs/console.md shows these; refresh with MODELNODE_CONSOLE_SCREENSHOTS=1."""
    names = {p.stem for p in SHOTS.glob("*.png")}
    assert {"overview", "jobs", "job", "viewer", "models", "model", "login"} <= names, sorted(names)
