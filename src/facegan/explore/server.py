"""The HTTP side of ``facegan explore``: the standard library's ThreadingHTTPServer and the routes.

Why http.server: the page needs a dozen JSON routes and three static files on 127.0.0.1 for one
person; the standard library does that with no new dependency, and every request's work is the
model's (tens of milliseconds), not the server's (docs/explore.md measures both).

Routes (JSON in and out; a face is :func:`face_json`):

    GET  /, /explore.js, /explore.css        the page (read once at start from ``static/``)
    GET  /api/model                          factors, code sizes, template triangles, upload limit
    POST /api/random      {"seed"?}          -> face
    POST /api/redraw      {"face", "keep", "seed"?}                     -> face
    POST /api/transfer    {"target", "source", "mode"?, "factor"?}       -> face
    POST /api/interpolate {"a", "b", "factor", "t"}                      -> face
    POST /api/upload?name=scan.obj  (raw file bytes, Content-Length required) -> face with errors
    GET  /api/face/<id>.obj | .ply | /codes.json | /image.png            downloads

Safety: the client's path is only ever a dictionary key or matched by a pattern, never a file
path; uploads are size-checked from Content-Length before any of the body is read; on a loopback
address the Host header must name the server (no DNS rebinding) and a request carrying an Origin
must come from the page's own origin (no cross-site requests from other pages in the browser).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from facegan.errors import FaceganError
from facegan.explore.session import ExploreSession, Face, UnknownFace, client_file_name

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_BYTES = 20_000_000
JSON_BODY_LIMIT = 64_000  # action requests are a few ids and numbers
DISCARD_SECONDS = 2.0  # after a 413: how long the rest of a refused body is read and dropped
STATIC_DIR = Path(__file__).parent / "static"
# URL path -> (file in STATIC_DIR, content type): the only files the server ever reads for a client
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/explore.js": ("explore.js", "text/javascript; charset=utf-8"),
    "/explore.css": ("explore.css", "text/css; charset=utf-8"),
}
FACE_ROUTE = re.compile(r"/api/face/(f[0-9]{1,12})(\.obj|\.ply|/codes\.json|/image\.png)")
DOWNLOAD_TYPES = {".obj": "text/plain; charset=utf-8", ".ply": "application/octet-stream",
                  "/codes.json": "application/json", "/image.png": "image/png"}

PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>facegan explore</title>
<h1>facegan explore</h1>
<p>The page's bundle is missing from this installation ({missing} in {folder}).
Rebuild it as docs/explore.md describes ("Rebuilding the bundle").</p>
<p>The API is up: <a href="/api/model">/api/model</a>.</p>
"""


class HttpError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_static(folder: Path = STATIC_DIR) -> tuple[dict[str, tuple[bytes, str]], list[str]]:
    """The page's files by URL path, read once, and the names of those missing. With any file missing,
    "/" is a placeholder page saying so (the API still works) and the missing assets are not served."""
    files, missing = {}, []
    for url, (name, content_type) in STATIC_FILES.items():
        path = folder / name
        if path.is_file():
            files[url] = (path.read_bytes(), content_type)
        else:
            missing.append(name)
    if missing:
        page = PLACEHOLDER.format(missing=", ".join(missing), folder=folder)
        files["/"] = (page.encode(), STATIC_FILES["/"][1])
    return files, missing


def b64(array: np.ndarray, dtype: str) -> str:
    """base64 of the array's values as little-endian ``dtype`` ("<f4", "<u4"), C order."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def face_json(face: Face) -> dict[str, Any]:
    """The wire form of a face: vertices (V*3) and errors (V) as base64 little-endian float32."""
    return {
        "id": face.id, "label": face.label, "vertices": b64(face.vertices, "<f4"),
        "errors": None if face.errors is None else b64(face.errors, "<f4"),
        "fit_error_mm": face.fit_error_mm,
        "codes": {name: code[0].tolist() for name, code in face.codes.items()},
        "image": f"/api/face/{face.id}/image.png", "ms": round(face.ms, 1),
    }


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExploreServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer around one :class:`ExploreSession` (bind with :func:`make_server`)."""

    daemon_threads = True  # a stuck client never keeps the process alive after Ctrl-C

    def __init__(self, session: ExploreSession, host: str, port: int, max_upload_bytes: int,
                 static_dir: Path = STATIC_DIR):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.session, self.max_upload_bytes = session, max_upload_bytes
        self.static, self.missing = load_static(static_dir)
        super().__init__((host, port), ExploreHandler)
        self.port = self.server_address[1]
        self.loopback = is_loopback(host)
        # The names a browser may use for a loopback server; anything else is a rebound DNS name.
        names = ("127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host)
        self.allowed_hosts = {n for name in names for n in (name, f"{name}:{self.port}")} if self.loopback else None

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def model_info(self) -> dict[str, Any]:
        info = self.session.describe()
        return {**info, "triangles": b64(info["triangles"], "<u4"), "upload_limit_bytes": self.max_upload_bytes}


class ExploreHandler(BaseHTTPRequestHandler):
    """One request: route it, answer JSON (or a file); errors are JSON {"error": one line}."""

    server: ExploreServer
    server_version = "facegan-explore"
    sys_version = ""
    timeout = 60  # seconds a client may stall mid-request before its thread gives up
    _body_read = False  # whether the request's body was read (a refused unread one is dropped)
    _discard = 0  # bytes of a refused body still to drop after the answer

    # ---------------------------------------------------------------------------- dispatch

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def do_HEAD(self) -> None:
        self._answer(self._get)

    def _answer(self, route: Callable[[str], tuple[bytes, str, dict[str, str]]]) -> None:
        try:
            self._check_origin()
            body, content_type, headers = route(urlsplit(self.path).path)
            self._send(HTTPStatus.OK, body, content_type, headers)
        except HttpError as exc:
            self._send_error_json(exc.status, str(exc))
        except UnknownFace as exc:
            self._send_error_json(HTTPStatus.NOT_FOUND, str(exc))
        except FaceganError as exc:
            self._send_error_json(HTTPStatus.BAD_REQUEST, str(exc))
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
            self.close_connection = True
        except Exception as exc:  # a bug: the traceback goes to the terminal, the server keeps going
            traceback.print_exc(file=sys.stderr)
            message = str(exc).splitlines()[0] if str(exc) else ""
            self._send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__} {message}")

    def _check_origin(self) -> None:
        host = self.headers.get("Host", "")
        if self.server.allowed_hosts is not None and host not in self.server.allowed_hosts:
            raise HttpError(HTTPStatus.FORBIDDEN, f"host {host[:80]!r} refused: open {self.server.url}")
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise HttpError(HTTPStatus.FORBIDDEN, f"request from another site ({origin[:80]}) refused")

    def _get(self, path: str) -> tuple[bytes, str, dict[str, str]]:
        if path in self.server.static:
            body, content_type = self.server.static[path]
            return body, content_type, {}
        if path == "/api/model":
            return _json_bytes(self.server.model_info()), "application/json", {}
        match = FACE_ROUTE.fullmatch(path)
        if match is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {path[:80]}")
        face_id, kind = match.groups()
        session = self.server.session
        if kind in (".obj", ".ply"):
            body = session.mesh_file(face_id, kind[1:])
            return body, DOWNLOAD_TYPES[kind], {"Content-Disposition": f'attachment; filename="{face_id}{kind}"'}
        if kind == "/codes.json":
            disposition = f'attachment; filename="{face_id}_codes.json"'
            return _json_bytes(session.codes_json(face_id)), DOWNLOAD_TYPES[kind], {"Content-Disposition": disposition}
        return session.image_png(face_id), DOWNLOAD_TYPES[kind], {}

    def _post(self, path: str) -> tuple[bytes, str, dict[str, str]]:
        session = self.server.session
        if path == "/api/upload":
            name = client_file_name(parse_qs(urlsplit(self.path).query).get("name", [""])[0])
            face = session.upload(self._read_upload(name), name)
            return _json_bytes(face_json(face)), "application/json", {}
        actions: dict[str, Callable[[dict], Face]] = {
            "/api/random": lambda b: session.random(_field(b, "seed", int, None)),
            "/api/redraw": lambda b: session.redraw(_field(b, "face", str), _field(b, "keep", str),
                                                    _field(b, "seed", int, None)),
            "/api/transfer": lambda b: session.transfer(_field(b, "target", str), _field(b, "source", str),
                                                        _field(b, "mode", str, "replace"),
                                                        _field(b, "factor", str, "expression")),
            "/api/interpolate": lambda b: session.interpolate(_field(b, "a", str), _field(b, "b", str),
                                                              _field(b, "factor", str, "identity"),
                                                              _field(b, "t", float)),
        }
        if path not in actions:
            raise HttpError(HTTPStatus.NOT_FOUND, f"not found: POST {path[:80]}")
        return _json_bytes(face_json(actions[path](self._read_json()))), "application/json", {}

    # ---------------------------------------------------------------------------- bodies

    def _content_length(self, required: bool, what: str) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if required:
                raise HttpError(HTTPStatus.LENGTH_REQUIRED, f"{what}: Content-Length header required")
            return 0
        if not raw.strip().isdigit():
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{what}: bad Content-Length {raw[:20]!r}")
        return int(raw)

    def _read_json(self) -> dict:
        length = self._content_length(False, "request")
        if length > JSON_BODY_LIMIT:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes is too large")
        raw = self.rfile.read(length) if length else b"{}"
        self._body_read = True
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return body

    def _read_upload(self, name: str) -> bytes:
        """The upload's bytes, after its announced length was checked against the limit."""
        shown = name or "upload"
        length = self._content_length(True, shown)
        limit = self.server.max_upload_bytes
        if length > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"{shown}: {length / 1e6:.1f} MB, over the upload limit of {limit / 1e6:g} MB")
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) != length:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{shown}: upload ended after {len(data)} of {length} bytes")
        return data

    def _refuse_unread_body(self) -> None:
        """Before refusing a POST whose body was not read (too large, wrong route, another site...):
        close the connection after the answer, and follow the answer with up to DISCARD_SECONDS of
        reading and dropping what the client still sends (a browser cut off mid-upload would show
        "connection reset" instead of the message)."""
        headers = getattr(self, "headers", None)  # absent when the request line itself was bad
        raw = headers.get("Content-Length", "") if headers is not None else ""
        if self.command == "POST" and not self._body_read and raw.strip().isdigit():
            self.close_connection = True
            self._discard = int(raw)

    def _drop_refused_body(self) -> None:
        remaining, deadline = self._discard, time.monotonic() + DISCARD_SECONDS
        try:
            self.connection.settimeout(DISCARD_SECONDS)
            while remaining > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    # ---------------------------------------------------------------------------- answers

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self._discard:
            self.wfile.flush()
            self._drop_refused_body()

    def _send_error_json(self, status: int, message: str) -> None:
        message = " ".join(message.split())  # one line, whatever the cause
        self._refuse_unread_body()
        self.log_message("%s %s -> %d %s", self.command, getattr(self, "path", "")[:80], int(status), message)
        self._send(status, _json_bytes({"error": message}), "application/json")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (malformed request line, unknown method, ...) as JSON too."""
        self.close_connection = True
        self._send_error_json(code, message or HTTPStatus(code).phrase)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Successful requests are not logged (a page session makes hundreds); errors are, in one line."""

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"explore: {format % args}\n")


def _field(body: dict, name: str, kind: type, default: Any = ...) -> Any:
    """body[name] checked to be a ``kind`` (int for float fields too; never bool); ``default`` if absent
    (required when no default is given). HttpError 400 otherwise."""
    if name not in body or body[name] is None:
        if default is ...:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"missing field {name!r}")
        return default
    value = body[name]
    kinds = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = "a number" if kind is float else kind.__name__
        raise HttpError(HTTPStatus.BAD_REQUEST, f"field {name!r} must be {expected}")
    return value


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _check_upload_limit(max_upload_bytes: int) -> None:
    if max_upload_bytes < 1:
        raise FaceganError(f"--max-upload-mb: the upload limit must be positive, got {max_upload_bytes} bytes")


def make_server(session: ExploreSession, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, static_dir: Path = STATIC_DIR) -> ExploreServer:
    """A server bound to ``host:port`` (port 0: any free port), not yet serving (call ``serve_forever``)."""
    _check_upload_limit(max_upload_bytes)
    try:
        return ExploreServer(session, host, port, max_upload_bytes, static_dir)
    except OSError as exc:  # port in use, no such address, no permission
        raise FaceganError(f"{host}:{port}: cannot listen ({exc.strerror or exc})") from None


def serve(model_path: str | os.PathLike | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, open_browser: bool = True,
          echo: Callable[[str], None] = print) -> None:
    """Load the model (the shipped one when ``model_path`` is None), serve the page until Ctrl-C."""
    _check_upload_limit(max_upload_bytes)  # before seconds of loading
    started = time.perf_counter()
    echo(f"loading {model_path or 'the shipped model'} ...")
    session = ExploreSession.open(model_path)
    server = make_server(session, host, port, max_upload_bytes)
    if server.missing:
        echo(f"warning: the page's bundle lacks {', '.join(server.missing)}; {server.url} shows a placeholder")
    if not server.loopback:
        echo(f"warning: listening on {host}, not on a loopback address: anyone who can reach this machine "
             "can use the page and upload files to it")
    echo(f"facegan explore: {server.url} (model ready in {time.perf_counter() - started:.1f} s; Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("stopped")
    finally:
        server.server_close()
