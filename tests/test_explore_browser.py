"""The `facegan explore` page, end to end: the real server with the shipped model, Debian's chromium
driven by Playwright, every action clicked through and checked on what the page shows.

Screenshots go to $FACEGAN_SCREENSHOTS (default out/explore-screenshots). Without chromium or
Playwright these tests skip, except when $CI is set: then they fail, so CI cannot pass without them.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("FACEGAN_SCREENSHOTS") or ROOT / "out" / "explore-screenshots")
CHROMIUM = os.environ.get("FACEGAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 30_000  # one action; the machine may be busy with training runs
FIT_TIMEOUT_MS = 120_000  # one upload's fit


def missing(reason: str) -> None:
    """Skip for a missing browser, but fail under CI (where the README's test command installs it)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the browser tests must run (see README, 'Run the tests')", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server():
    """`facegan explore` on the shipped model, on an ephemeral loopback port, served from a thread."""
    from facegan.explore.server import make_server
    from facegan.explore.session import ExploreSession

    srv = make_server(ExploreSession.open(None), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        missing("chromium not found (apt-get install -y chromium, or set FACEGAN_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    """The page, loaded, showing its first (random) face; fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True,
                                  base_url=server.url)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    script_errors: list[str] = []
    pg.on("pageerror", lambda exc: script_errors.append(str(exc)))
    pg.goto("/")
    pg.wait_for_function("document.querySelector('#view3d').dataset.faceId !== ''")
    pg.wait_for_function("document.body.dataset.busy === '0'")
    yield pg
    context.close()
    assert not script_errors, f"script errors on the page: {script_errors}"


# ------------------------------------------------------------------------------------- helpers


def shown(page) -> str:
    """Id of the face in the 3D view."""
    return page.get_attribute("#view3d", "data-face-id")


def new_face(page, click) -> str:
    """Do ``click`` (a selector or a callable) and wait until the view shows another face; its id."""
    before = shown(page)
    click() if callable(click) else page.click(click)
    page.wait_for_function("before => document.querySelector('#view3d').dataset.faceId !== before"
                           " && document.body.dataset.busy === '0'", arg=before)
    return shown(page)


def codes(page, face_id: str) -> dict[str, np.ndarray]:
    """A face's codes as the page's "codes JSON" link serves them: {name: (n,) array}."""
    data = page.request.get(f"/api/face/{face_id}/codes.json").json()
    return {name: np.array(data[name][0]) for name in (*data["factors"], "noise")}


def pick(page, role: str, face_id: str) -> None:
    """Choose ``face_id`` as face A or B in the face list."""
    page.check(f'#faces li[data-face-id="{face_id}"] .pick-{role} input')


def view(page) -> dict[str, float]:
    """The camera the 3D view reports: distance, azimuth, polar angle."""
    data = page.eval_on_selector("#view3d", "e => ({...e.dataset})")
    return {k: float(data[k]) for k in ("cameraDistance", "cameraAzimuth", "cameraPolar")}


def canvas_pixels(page) -> np.ndarray:
    """The 3D view's pixels (H, W, 3) uint8."""
    from PIL import Image

    png = page.locator("#view3d canvas").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def screenshot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def download(page, link: str, folder: Path) -> Path:
    """Click a download link; the saved file."""
    with page.expect_download() as info:
        page.click(link)
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def error_line(page) -> str:
    page.wait_for_selector("#error", state="visible")
    return page.inner_text("#error")


def upload(page, name: str, data: bytes) -> None:
    page.set_input_files("#upload", files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}])


# ------------------------------------------------------------------------------------- the view


def test_page_shows_a_face_in_3d_beside_its_geometry_image(page, server):
    model = server.session.describe()
    assert page.get_attribute("#view3d", "data-vertex-count") == str(model["n_vertices"])
    assert re.fullmatch(r"f\d+", shown(page))
    assert f"{model['n_vertices']:,} vertices" in page.inner_text("#model-info")
    page.wait_for_function("() => { const i = document.querySelector('#geometry-image');"
                           " return i.complete && i.naturalWidth > 0; }")
    size = page.eval_on_selector("#geometry-image", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [model["resolution"]] * 2
    # shaded: the face in the middle of the view has many gray levels, not one flat color
    pixels = canvas_pixels(page)
    h, w, _ = pixels.shape
    middle = pixels[h // 3: 2 * h // 3, w // 3: 2 * w // 3].mean(axis=2)
    assert len(np.unique(middle.round())) > 40 and middle.std() > 5
    screenshot(page, "face")


def test_view_rotates_zooms_and_shows_a_wireframe(page):
    start = view(page)
    box = page.locator("#view3d canvas").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 150, cy + 40, steps=8)
    page.mouse.up()
    rotated = view(page)
    assert abs(rotated["cameraAzimuth"] - start["cameraAzimuth"]) > 10
    assert rotated["cameraDistance"] == pytest.approx(start["cameraDistance"], rel=1e-3)
    page.mouse.wheel(0, -600)
    page.wait_for_function("d => Number(document.querySelector('#view3d').dataset.cameraDistance) < d",
                           arg=0.95 * rotated["cameraDistance"])
    shaded = canvas_pixels(page)
    page.check("#wireframe")
    assert page.get_attribute("#view3d", "data-wireframe") == "on"
    assert np.abs(canvas_pixels(page).astype(int) - shaded).mean() > 0.5  # the edges are drawn
    screenshot(page, "rotated-zoomed-wireframe")
    page.uncheck("#wireframe")
    page.click("#reset-view")
    assert view(page) == pytest.approx(start, abs=0.2)


# ------------------------------------------------------------------------------------- drawing faces


def test_random_and_redraw_keep_the_chosen_factor(page):
    first = shown(page)
    drawn = new_face(page, "#random")
    assert drawn != first and "random" in page.inner_text("#face-label")
    same_identity = new_face(page, "#keep-identity")
    a, b = codes(page, drawn), codes(page, same_identity)
    assert np.array_equal(a["identity"], b["identity"]) and not np.allclose(a["expression"], b["expression"])
    same_expression = new_face(page, "#keep-expression")
    c = codes(page, same_expression)
    assert np.array_equal(b["expression"], c["expression"]) and not np.allclose(b["identity"], c["identity"])
    listed = page.eval_on_selector_all("#faces li", "items => items.map(li => li.dataset.faceId)")
    assert listed[:4] == [same_expression, same_identity, drawn, first]  # newest first
    page.click(f'#faces li[data-face-id="{drawn}"] .face-show')
    assert shown(page) == drawn
    screenshot(page, "redraw")


def test_transfer_replaces_or_adds_the_expression_of_a_to_b(page):
    a = shown(page)
    b = new_face(page, "#random")
    pick(page, "a", a)
    pick(page, "b", b)
    replaced = new_face(page, "#transfer-replace")
    ca, cb, cr = codes(page, a), codes(page, b), codes(page, replaced)
    assert np.array_equal(cr["identity"], cb["identity"]) and np.array_equal(cr["expression"], ca["expression"])
    added = new_face(page, "#transfer-add")
    cadd = codes(page, added)
    assert np.array_equal(cadd["identity"], cb["identity"])
    assert np.allclose(cadd["expression"], ca["expression"] + cb["expression"], atol=1e-5)
    assert f"{b} + expression of {a}" in page.inner_text("#face-label")
    screenshot(page, "transfer")


@pytest.mark.parametrize("factor, other", [("identity", "expression"), ("expression", "identity")])
def test_slider_moves_between_a_and_b_in_one_factor(page, factor, other):
    a = shown(page)
    b = new_face(page, "#random")
    pick(page, "a", a)
    pick(page, "b", b)
    page.select_option("#interp-factor", factor)
    entries = page.locator("#faces li").count()
    half = new_face(page, lambda: page.fill("#interp-t", "0.5"))
    ca, cb, ch = codes(page, a), codes(page, b), codes(page, half)
    assert np.allclose(ch[factor], (ca[factor] + cb[factor]) / 2, atol=1e-6)
    assert np.array_equal(ch[other], ca[other])
    assert f"{factor} t=0.50" in page.inner_text("#face-label")
    end = new_face(page, lambda: page.fill("#interp-t", "1"))
    assert np.allclose(codes(page, end)[factor], cb[factor])
    assert page.locator("#faces li").count() == entries + 1  # one slide, one list entry (its latest step)
    screenshot(page, f"interpolate-{factor}")


# ------------------------------------------------------------------------------------- files


def test_downloads_give_the_face_as_obj_ply_and_codes(page, server, tmp_path):
    n_vertices = server.session.describe()["n_vertices"]
    face = shown(page)
    obj = download(page, "#download-obj", tmp_path)
    assert obj.name == f"{face}.obj"
    assert sum(line.startswith("v ") for line in obj.read_text().splitlines()) == n_vertices
    ply = download(page, "#download-ply", tmp_path).read_bytes()
    assert ply.startswith(b"ply") and f"element vertex {n_vertices}".encode() in ply
    data = json.loads(download(page, "#download-codes", tmp_path).read_text())
    assert data["factors"] == ["identity", "expression"] and len(data["identity"][0]) == 65


def test_upload_fits_the_mesh_shows_the_error_map_and_edits_its_expression(page, tmp_path):
    scan = download(page, "#download-obj", tmp_path)  # a registered mesh in the template topology
    upload(page, "scan.obj", scan.read_bytes())
    status = page.locator("#upload-status")
    assert "fitting scan.obj" in status.inner_text()
    page.wait_for_selector("#upload-status[data-state='done']", timeout=FIT_TIMEOUT_MS)
    fit_error = float(re.fullmatch(r"fit error (\d+\.\d+) mm \(mean\)", status.inner_text()).group(1))
    assert 0 < fit_error < 3
    fitted = shown(page)
    assert "fit of scan.obj" in page.inner_text("#face-label")
    assert page.get_attribute("#view3d", "data-error-map") == "on"
    assert page.is_visible("#legend") and re.fullmatch(r"≥ \d+\.\d\d mm", page.inner_text("#legend-top"))
    screenshot(page, "fit-error-map")
    page.uncheck("#error-map")
    assert page.get_attribute("#view3d", "data-error-map") == "off" and not page.is_visible("#legend")
    page.check("#error-map")
    edited = new_face(page, "#keep-identity")
    assert np.array_equal(codes(page, edited)["identity"], codes(page, fitted)["identity"])
    assert f"{fitted} identity + new expression" in page.inner_text("#face-label")
    assert page.get_attribute("#view3d", "data-error-map") == "off" and not page.is_visible("#legend")


def nan_obj(page) -> bytes:
    """The shown face as an OBJ with one NaN coordinate."""
    text = page.request.get(f"/api/face/{shown(page)}.obj").text()
    return re.sub(r"^v [^\n]*", "v nan 0 0", text, count=1, flags=re.M).encode()


@pytest.mark.parametrize("name, content, message", [
    ("triangle.obj", lambda page: b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", r"triangle\.obj: .*3 vertices"),
    ("holes.obj", nan_obj, r"holes\.obj: .*(nan|NaN|finite)"),
    ("noise.ply", lambda page: bytes(range(256)) * 8, r"noise\.ply: "),
    ("notes.txt", lambda page: b"not a mesh", r"notes\.txt: not a mesh file"),
], ids=["wrong-vertex-count", "nan", "garbage-ply", "not-a-mesh-file"])
def test_bad_upload_shows_a_message_and_the_page_keeps_working(page, name, content, message):
    before = shown(page)
    upload(page, name, content(page))
    assert re.search(message, error_line(page)), error_line(page)
    page.wait_for_selector("#upload-status[data-state='failed']")
    assert shown(page) == before
    screenshot(page, f"bad-upload-{Path(name).stem}")
    new_face(page, "#random")
    assert not page.is_visible("#error")
