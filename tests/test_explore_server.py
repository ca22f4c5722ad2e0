"""facegan explore: the session (draw, redraw, transfer, interpolate, fit an upload, export) and its
HTTP API, called with urllib against a server on an ephemeral port around the shipped model."""

from __future__ import annotations

import base64
import http.client
import inspect
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from facegan.explore import server as server_module
from facegan.explore.session import ExploreSession, UnknownFace, client_file_name
from facegan.fit.editing import add_factor, replace_factor
from facegan.fit.fitting import FitOptions, decode_codes
from facegan.fit.outputs import load_codes
from facegan.mesh.io import read_mesh_vertices, write_mesh
from facegan.sampling import SHIPPED_MODEL, load

pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason="no shipped model in this installation")

UPLOAD_LIMIT = 2_000_000  # bytes: an OBJ of the 6,706-vertex template is ~0.6 MB
# One short attempt: a face the model generated itself fits well within it (~0.5 s on 2 cores).
FIT = FitOptions(iterations=100, max_restarts=0)


@pytest.fixture(scope="module")
def session() -> ExploreSession:
    return ExploreSession(load(None, "cpu"), max_faces=64, fit_options=FIT)


@pytest.fixture(scope="module")
def server(session):
    srv = server_module.make_server(session, port=0, max_upload_bytes=UPLOAD_LIMIT)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, path: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
    """(status, parsed JSON or raw bytes) of a GET (body None) or POST (dict -> JSON, bytes -> raw)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw, kind = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        status, raw, kind = exc.code, exc.read(), exc.headers["Content-Type"]
    return status, json.loads(raw) if kind == "application/json" else raw


def raw_get(server, path: str, headers: dict | None = None) -> tuple[int, bytes, str]:
    """(status, body, content type) of a GET of ``path`` exactly as given (no client-side normalization)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    answer = response.status, response.read(), response.getheader("Content-Type")
    conn.close()
    return answer


def vertices_of(face: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(face["vertices"]), dtype="<f4").reshape(-1, 3)


def codes_of(face: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v], dtype=torch.float32) for k, v in face["codes"].items()}


def assert_alive(server) -> None:
    status, info = call(server, "/api/model")
    assert status == 200 and info["n_vertices"] == 6706


def new_face(server, seed: int) -> dict:
    status, face = call(server, "/api/random", {"seed": seed})
    assert status == 200, face
    return face


# ------------------------------------------------------------------------------ the session


def test_a_new_session_is_warm(session):
    """The dense reconstruction's factored system (seconds to build) exists before any request."""
    assert "dense" in session.codec.__dict__ and "pixel_map" in session.codec.__dict__


def test_the_store_keeps_the_most_recently_used_faces(session):
    small = ExploreSession(session.model, max_faces=2)
    a, b = small.random(seed=1), small.random(seed=2)
    small.face(a.id)  # a is now more recent than b
    c = small.random(seed=3)
    assert len(small) == 2 and small.face(a.id) is a and small.face(c.id) is c
    with pytest.raises(UnknownFace, match=f"unknown face {b.id}"):
        small.face(b.id)


def test_client_file_names_are_base_names_of_safe_characters():
    assert client_file_name("../../etc/passwd") == "passwd"
    assert client_file_name("C:\\scans\\a<b>.obj") == "a_b_.obj"
    long = client_file_name("x" * 300 + ".ply")
    assert len(long) == 80 and long.endswith(".ply")


# ------------------------------------------------------------------------------ model and faces


def test_model_route_describes_the_template(server, session):
    status, info = call(server, "/api/model")
    assert status == 200
    assert info["factors"] == ["identity", "expression"] and info["code_sizes"] == [65, 15] and info["noise_size"] == 5
    triangles = np.frombuffer(base64.b64decode(info["triangles"]), dtype="<u4").reshape(-1, 3)
    np.testing.assert_array_equal(triangles, session.codec.template.triangles)
    assert info["n_triangles"] == len(triangles) and info["resolution"] == 64
    assert info["upload_limit_bytes"] == UPLOAD_LIMIT and info["source"] == str(SHIPPED_MODEL)


def test_a_random_face_is_the_dense_decoding_of_prior_codes(server, session):
    face = new_face(server, 3)
    again = new_face(server, 3)
    _, codes = session.model.sample(1, seed=3)
    for name, code in codes.items():
        np.testing.assert_array_equal(face["codes"][name], code[0].numpy())
    assert again["id"] != face["id"] and again["codes"] == face["codes"]
    assert face["label"] == "random 3" and face["errors"] is None and face["fit_error_mm"] is None
    np.testing.assert_allclose(vertices_of(face), decode_codes(session.model, codes, "dense")[0].numpy(), atol=1e-4)
    assert face["image"] == f"/api/face/{face['id']}/image.png" and face["ms"] > 0


def test_a_random_face_without_seed_is_new_each_time(server):
    _, a = call(server, "/api/random", {})
    _, b = call(server, "/api/random", b"")  # an empty body is an empty request
    assert a["codes"]["identity"] != b["codes"]["identity"]


@pytest.mark.parametrize("keep, drawn", [("identity", "expression"), ("expression", "identity")])
def test_redraw_keeps_one_code_and_draws_the_others(server, keep, drawn):
    face = new_face(server, 4)
    status, redrawn = call(server, "/api/redraw", {"face": face["id"], "keep": keep})
    assert status == 200
    assert redrawn["codes"][keep] == face["codes"][keep]
    assert redrawn["codes"][drawn] != face["codes"][drawn] and redrawn["codes"]["noise"] != face["codes"]["noise"]
    assert redrawn["label"] == f"{face['id']} {keep} + new {drawn}"


@pytest.mark.parametrize("mode, edit", [("replace", replace_factor), ("add", add_factor)])
def test_transfer_is_the_editing_function(server, mode, edit):
    target, source = new_face(server, 5), new_face(server, 6)
    status, edited = call(server, "/api/transfer", {"target": target["id"], "source": source["id"], "mode": mode})
    assert status == 200
    expected = edit(codes_of(target), codes_of(source), "expression")
    for name, code in expected.items():
        np.testing.assert_array_equal(edited["codes"][name], code[0].numpy())


@pytest.mark.parametrize("factor", ["identity", "expression", "all"])
def test_interpolation_ends_are_the_endpoints(server, factor):
    a, b = new_face(server, 7), new_face(server, 8)
    moved = ["identity", "expression", "noise"] if factor == "all" else [factor]
    ends = {t: call(server, "/api/interpolate", {"a": a["id"], "b": b["id"], "factor": factor, "t": t})[1]
            for t in (0, 0.5, 1.0)}
    assert ends[0]["codes"] == a["codes"]
    for name in a["codes"]:
        assert ends[1.0]["codes"][name] == (b if name in moved else a)["codes"][name]
        middle = (np.array(a["codes"][name]) + np.array(b["codes"][name])) / 2 if name in moved else a["codes"][name]
        np.testing.assert_allclose(ends[0.5]["codes"][name], middle, atol=1e-6)
    assert ends[0.5]["label"] == f"{a['id']}→{b['id']} {factor} t=0.50"


# ------------------------------------------------------------------------------ uploads


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_an_uploaded_mesh_is_fitted(server, session, tmp_path, suffix):
    face = new_face(server, 9)
    path = tmp_path / f"scan{suffix}"
    write_mesh(path, vertices_of(face), session.codec.template.triangles)
    status, fit = call(server, f"/api/upload?name=scan{suffix}", path.read_bytes())
    assert status == 200, fit
    errors = np.frombuffer(base64.b64decode(fit["errors"]), dtype="<f4")
    assert errors.shape == (6706,) and fit["label"] == f"fit of scan{suffix}"
    np.testing.assert_allclose(errors, np.linalg.norm(vertices_of(fit) - vertices_of(face), axis=1), atol=1e-4)
    assert fit["fit_error_mm"] == pytest.approx(float(errors.mean()), rel=1e-5)
    assert fit["fit_error_mm"] < 1.5  # mm; the shipped model's generalization to new faces is 0.78 mm


def _obj(vertices: np.ndarray) -> bytes:
    return "".join(f"v {x} {y} {z}\n" for x, y, z in vertices).encode()


@pytest.fixture(scope="module")
def template_vertices(session) -> np.ndarray:
    return session.codec.template.vertices


BAD_UPLOADS = {
    "wrong vertex count": ("scan.obj", lambda v: _obj(v[:120]), "scan.obj: 120 vertices, the template has 6706"),
    "NaN coordinates": ("nan.obj", lambda v: _obj(np.where(np.arange(len(v))[:, None] == 5, np.nan, v)),
                        "nan.obj: 1 vertices have NaN or infinite coordinates"),
    "garbage OBJ": ("junk.obj", lambda v: bytes(range(256)) * 4, "junk.obj: unreadable OBJ"),
    "garbage PLY": ("junk.ply", lambda v: b"ply\nformat nonsense\n" + bytes(range(256)), "junk.ply: unreadable PLY"),
    "empty OBJ": ("empty.obj", lambda v: b"", "empty.obj: no vertices"),
    "not a mesh extension": ("notes.txt", lambda v: _obj(v), "notes.txt: not a mesh file"),
    "a path as name": ("../../secret/scan.stl", lambda v: _obj(v), "scan.stl: not a mesh file"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_is_one_line_naming_the_clients_file(server, template_vertices, case):
    name, body, message = BAD_UPLOADS[case]
    status, answer = call(server, f"/api/upload?name={name}", body(template_vertices))
    assert status == 400 and list(answer) == ["error"]
    assert answer["error"].startswith(message) and "\n" not in answer["error"]
    assert "/tmp" not in answer["error"] and "facegan-upload" not in answer["error"]
    assert_alive(server)


def test_a_too_large_upload_is_refused_before_its_body_is_read(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)  # a server waiting for the body: timeout
    conn.putrequest("POST", "/api/upload?name=big.obj")
    conn.putheader("Content-Length", str(UPLOAD_LIMIT + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read()) == {"error": "big.obj: 2.0 MB, over the upload limit of 2 MB"}
    conn.close()
    status, answer = call(server, "/api/upload?name=big.ply", b"x" * (UPLOAD_LIMIT + 100_000))  # sent in full
    assert status == 413 and answer["error"].startswith("big.ply: 2.1 MB, over the upload limit")
    assert_alive(server)


def test_an_upload_without_length_is_refused(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/api/upload?name=scan.obj")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
    conn.close()


# ------------------------------------------------------------------------------ downloads


def test_downloads_are_the_face(server, session, tmp_path):
    face = new_face(server, 10)
    for suffix in (".obj", ".ply"):
        status, body = call(server, f"/api/face/{face['id']}{suffix}")
        assert status == 200
        (tmp_path / f"face{suffix}").write_bytes(body)
        vertices = read_mesh_vertices(tmp_path / f"face{suffix}", 6706)
        np.testing.assert_allclose(vertices, vertices_of(face), atol=1e-5)
    status, codes = call(server, f"/api/face/{face['id']}/codes.json")
    (tmp_path / "codes.json").write_text(json.dumps(codes))
    loaded = load_codes(tmp_path / "codes.json", session.model)
    for name, code in codes_of(face).items():
        torch.testing.assert_close(loaded[name], code, rtol=0, atol=0)
    status, png = call(server, face["image"])
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert status == 200 and image.size == (64, 64) and image.mode == "RGB"


def test_unknown_faces_are_404(server):
    unknown = (404, {"error": "unknown face f999999"})
    assert call(server, "/api/face/f999999.obj") == unknown
    assert call(server, "/api/redraw", {"face": "f999999", "keep": "identity"}) == unknown


# ------------------------------------------------------------------------------ safety


@pytest.mark.parametrize("path", ["/../pyproject.toml", "/%2e%2e/pyproject.toml", "/%2e%2e%2fpyproject.toml",
                                  "/explore.js/../../../pyproject.toml", "/static/../../../../pyproject.toml",
                                  "/api/face/../../../pyproject.toml", "//etc/passwd", "/index.html", "/THREE_LICENSE",
                                  "/session.py", "/api/face/f1.obj/../../../../etc/passwd"])
def test_paths_never_reach_files(server, path):
    status, body, _ = raw_get(server, path)
    assert status == 404 and b"[project]" not in body and b"root:" not in body and b"import" not in body


def test_requests_for_another_host_or_from_another_site_are_refused(server):
    assert raw_get(server, "/api/model", {"Host": "attacker.example:80"})[0] == 403  # DNS rebinding
    status, answer = call(server, "/api/random", {}, {"Origin": "http://attacker.example"})
    assert status == 403 and "another site" in answer["error"]
    assert call(server, "/api/random", {}, {"Origin": f"http://127.0.0.1:{server.port}"})[0] == 200


def test_the_default_address_is_loopback(server):
    from facegan import cli

    assert server.server_address[0] == "127.0.0.1" and server.loopback
    for function in (server_module.make_server, server_module.serve):
        assert inspect.signature(function).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli.explore).parameters["host"].default.default == "127.0.0.1"


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/redraw", b"{not json", 400, "request body is not valid JSON"),
    ("/api/redraw", b"[1, 2]", 400, "request body must be a JSON object"),
    ("/api/redraw", {"keep": "identity"}, 400, "missing field 'face'"),
    ("/api/random", {"seed": "three"}, 400, "field 'seed' must be int"),
    ("/api/random", {"seed": -1}, 400, "seed -1: need an integer"),
    ("/api/interpolate", {"a": "ID", "b": "ID", "factor": "identity", "t": 1.5}, 400, "interpolate: t=1.5"),
    ("/api/transfer", {"target": "ID", "source": "ID", "mode": "swap"}, 400, "transfer: unknown mode 'swap'"),
    ("/api/redraw", {"face": "ID", "keep": "age"}, 400, "keep: unknown factor 'age'"),
    ("/api/nothing", {}, 404, "not found: POST /api/nothing"),
])
def test_bad_requests_are_one_line_json_errors(server, path, body, status, message):
    face_id = new_face(server, 11)["id"]
    if isinstance(body, dict):
        body = {k: face_id if v == "ID" else v for k, v in body.items()}
    got, answer = call(server, path, body, {"Content-Type": "application/json"})
    assert got == status and answer["error"].startswith(message)


def test_an_internal_error_is_a_500_and_the_server_goes_on(server, session, monkeypatch):
    face = new_face(server, 12)

    def broken(face_id):
        raise RuntimeError("boom")

    monkeypatch.setattr(session, "image_png", broken)
    assert call(server, face["image"]) == (500, {"error": "internal error: RuntimeError boom"})
    monkeypatch.undo()
    assert call(server, face["image"])[0] == 200


# ------------------------------------------------------------------------------ the page


def test_the_page_is_served_from_the_static_whitelist(server):
    if server.missing:
        pytest.skip(f"the page's bundle lacks {server.missing}")
    for path, (name, content_type) in server_module.STATIC_FILES.items():
        assert raw_get(server, path) == (200, (server_module.STATIC_DIR / name).read_bytes(), content_type)


def test_a_missing_bundle_gives_a_placeholder_page(tmp_path: Path):
    (tmp_path / "explore.css").write_text("body {}")
    files, missing = server_module.load_static(tmp_path)
    assert missing == ["index.html", "explore.js"]
    assert b"bundle is missing" in files["/"][0] and "/explore.js" not in files
    assert files["/explore.css"][0] == b"body {}"
