"""Test helpers: a real HTTP client (treq) that checks every answer against OpenAPI."""

from __future__ import annotations

import json
import re
from typing import Any

import treq

SECURITY_HEADERS = (
    "x-content-type-options", "x-frame-options", "strict-transport-security",
    "content-security-policy", "x-request-id",
)


class Response:
    """What the server said."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        """The JSON body."""
        return json.loads(self.body) if self.body else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


class OpenAPIChecker:
    """Checks real responses against the served OpenAPI document's schemas."""

    def __init__(self) -> None:
        self.document: dict[str, Any] | None = None
        self.checked = 0

    def load(self, document: dict[str, Any]) -> None:
        """Use the document a server actually served."""
        if self.document is None:
            from openapi_spec_validator import validate

            validate(document)
            self.document = document

    def check(self, method: str, path: str, status: int, body: Any) -> None:
        """Find the operation for this request and validate the body against its schema."""
        if self.document is None or body is None:
            return
        import jsonschema

        for template, ops in self.document["paths"].items():
            pattern = "^" + re.sub(r"{\w+}", r"[^/]+", template) + "$"
            if re.match(pattern, path) and method.lower() in ops:
                responses = ops[method.lower()]["responses"]
                spec = responses.get(str(status))
                assert spec is not None, f"{method} {path} answered undocumented {status}"
                schema = spec.get("content", {}).get("application/json", {}).get("schema")
                if schema is None:
                    return
                resolver_doc = {"components": self.document["components"], **schema}
                jsonschema.validate(body, resolver_doc,
                                    cls=jsonschema.Draft202012Validator)
                self.checked += 1
                return


class ApiClient:
    """Blocking-free HTTP calls over real sockets."""

    def __init__(self, base_url: str, checker: OpenAPIChecker) -> None:
        self.base_url = base_url
        self.checker = checker

    async def request(self, method: str, path: str, *, key: str | None = None,
                      json_body: Any = None, data: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Response:
        """Send one request and collect the whole answer."""
        if self.checker.document is None and path != "/api/v1/openapi.json":
            doc = await self.request("GET", "/api/v1/openapi.json")
            self.checker.load(doc.json)
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        if key is not None:
            hdrs["Authorization"] = [f"Bearer {key}"]
        if json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", ["application/json"])
        resp = await treq.request(method, self.base_url + path, headers=hdrs, data=data,
                                  persistent=False, allow_redirects=False)
        body = await treq.content(resp)
        headers_out = {k.decode().lower(): v[-1].decode()
                       for k, v in resp.headers.getAllRawHeaders()}
        result = Response(resp.code, headers_out, body)
        ctype = headers_out.get("content-type", "")
        if ctype.startswith("application/json") and path.startswith(("/api/v1/", "/admin/v1/")):
            self.checker.check(method, path.split("?")[0], resp.code,
                               result.json if body else None)
        return result

    async def get(self, path: str, **kw: Any) -> Response:
        """GET."""
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        """POST JSON."""
        return await self.request("POST", path, json_body=body if body is not None else {},
                                  **kw)

    async def patch(self, path: str, body: Any, **kw: Any) -> Response:
        """PATCH JSON."""
        return await self.request("PATCH", path, json_body=body, **kw)

    async def delete(self, path: str, **kw: Any) -> Response:
        """DELETE."""
        return await self.request("DELETE", path, **kw)


def execute(dsn: str, sql: str, params: tuple = ()) -> None:
    """Write to the database directly, committed at once (autocommit): what a test sets
    up or breaks behind the server's back."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
    finally:
        conn.close()


def query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the database directly (blocking; only for reads the server cannot block)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def http_answers(raw: bytes) -> list[tuple[bytes, dict[bytes, list[bytes]], bytes]]:
    """HTTP/1.1 answers as the socket carried them, one after another: (status line,
    header fields by lower-case name, body of exactly Content-Length bytes). Every
    answer must say its length."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(fields[b"content-length"][0])
        answers.append((lines[0], fields, rest[:length]))
        raw = rest[length:]
    return answers


def read_until_closed(sock: Any) -> bytes:
    """Everything a socket receives until the server closes it (bounded by the
    socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def exchange(port: int, request: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes to 127.0.0.1:``port`` and read until the server closes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_until_closed(sock)
