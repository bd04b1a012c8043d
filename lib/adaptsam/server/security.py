"""The server's front door: one ASGI middleware every request passes before any route.

- **Token.** With `ADAPTSAM_API_TOKEN` set in the server's environment, every route needs
  `Authorization: Bearer <token>` (401 otherwise, never 500). Browsers cannot add a header to a
  page load, so OHIF is opened once as `/ohif/?token=<token>`: the server answers with a
  same-site, HTTP-only cookie and a redirect to the same page without the token; the viewer's own
  requests (MONAI Label panel, DICOMweb proxy) then carry the cookie. 3D Slicer's MONAI Label
  module asks `GET /auth/` first and, seeing it enabled, logs in with `POST /auth/token`: any
  user name, the token as password. The token lives in the environment, not in `--conf`,
  because MONAI Label prints and exports its conf.
- **Names.** Ids, tags and file names in the query (`image`, `label`, `id`, `tag`, ...) and path
  segments are refused with 422 when they could name another file: separators, `..`, a leading
  dot, control characters.
- **Size.** A request body larger than the upload limit is refused from its Content-Length (413)
  or, when streamed without one, as soon as it passes the limit. JSON bodies (training and
  active-learning requests) are refused when nested deeper than any client sends.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from typing import Iterable, Optional, Sequence
from urllib.parse import parse_qsl, urlencode

TOKEN_ENV = "ADAPTSAM_API_TOKEN"
COOKIE = "adaptsam_token"
# query keys that name a datastore object, a tag, a session or a model
NAME_KEYS = ("image", "label", "id", "tag", "session_id", "model", "images", "strategy", "method")
MAX_JSON_DEPTH = 32
MAX_JSON_BODY = 4 << 20  # training and active-learning requests are a few hundred bytes
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def unsafe_name(value: str) -> Optional[str]:
    """Why `value` cannot be an id, tag or file name here, or None when it can."""
    if _UNSAFE.search(value):
        return "contains a path separator or a control character"
    if value.startswith("."):
        return "starts with a dot"
    if len(value) > 255:
        return "is longer than 255 characters"
    return None


def json_depth(text: bytes) -> int:
    """Nesting depth of a JSON text (brackets outside strings), without parsing it: Python's
    parser raises RecursionError, not a ValueError, on a deep enough one."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:
                in_string = False
        elif ch == 0x22:
            in_string = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest


def configured_token() -> str:
    return os.environ.get(TOKEN_ENV, "").strip()


class Guard:
    """Pure ASGI middleware (no body buffering except for small JSON bodies)."""

    def __init__(self, app, token: str = "", max_body: int = 1 << 30, open_paths: Sequence[str] = ()):
        self.app = app
        self.token = token
        self.max_body = int(max_body)
        self.open_paths = tuple(open_paths)  # the token login itself

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        query = scope.get("query_string", b"").decode("latin-1")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        why = self._bad_names(path, query)
        if why:
            return await _reply(send, 422, why)
        if self.token and path not in self.open_paths:
            if scope["method"] == "GET" and "token" in dict(parse_qsl(query)):
                return await self._login_by_link(scope, query, send)
            if not self._authorised(headers):
                return await _reply(send, 401, "this server needs its API token: Authorization: Bearer <token>",
                                    [(b"www-authenticate", b'Bearer realm="adaptsam"')])
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, 400, "Content-Length is not a number")
            if int(length) > self.max_body:
                return await _reply(send, 413, f"request body of {int(length)} bytes is over the upload limit of {self.max_body}")
        if headers.get("content-type", "").startswith("application/json") and scope["method"] in ("POST", "PUT"):
            body = await _read_body(receive, MAX_JSON_BODY)
            if body is None:
                return await _reply(send, 413, f"JSON body over {MAX_JSON_BODY} bytes")
            if json_depth(body) > MAX_JSON_DEPTH:
                return await _reply(send, 422, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return await self.app(scope, _replay(body), send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counting(receive), tracking_send)
        except UploadTooLarge as e:  # a streamed body passed the limit before any answer
            if started:
                raise
            await _reply(send, 413, str(e))

    def _bad_names(self, path: str, query: str) -> Optional[str]:
        segments = path.split("/")
        if any(s in (".", "..") for s in segments) or "\\" in path or "\x00" in path:
            return f"path {path!r} is not allowed"
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key in NAME_KEYS and value:
                why = unsafe_name(value)
                if why:
                    return f"{key} {value!r} {why}: ids, tags and names cannot point at files"
        return None

    def _authorised(self, headers) -> bool:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
            return True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and hmac.compare_digest(value.encode(), self.token.encode()):
                return True
        return False

    async def _login_by_link(self, scope, query: str, send):
        pairs = parse_qsl(query, keep_blank_values=True)
        given = dict(pairs)["token"]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return await _reply(send, 401, "wrong API token")
        rest = urlencode([(k, v) for k, v in pairs if k != "token"])
        location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"set-cookie", cookie.encode("latin-1")),
                                (b"content-length", b"0"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b""})

    def _counting(self, receive):
        seen = 0
        limit = self.max_body

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise UploadTooLarge(limit)
            return message

        return wrapped


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body over the upload limit of {limit} bytes")


async def _read_body(receive, limit: int) -> Optional[bytes]:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _reply(send, status: int, detail: str, extra: Iterable = ()):
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def install(fastapi_app, token: str, max_body: int, cors_origins: Sequence[str], open_paths: Sequence[str]) -> None:
    """Put the guard in front of every route and replace MONAI Label's CORS policy (any origin,
    with credentials) by an explicit list; an empty list allows only the server's own origin
    (same-origin requests need no CORS). The middleware stack is rebuilt: the server is already
    running when the app's `on_init_complete` calls this."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    kept = [m for m in fastapi_app.user_middleware if m.cls is not CORSMiddleware and m.cls is not Guard]
    cors = Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=bool(cors_origins),
                      allow_methods=["*"], allow_headers=["*"])
    guard = Middleware(Guard, token=token, max_body=max_body, open_paths=open_paths)
    fastapi_app.user_middleware[:] = [cors, guard, *kept]
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
