"""A test-owned fault proxy in front of moto: what moto cannot do (Throttling, 500s,
account suspension, timeouts) injected on the wire, so the app's real boto3 client and
error parsing are exercised.

A threaded HTTP reverse proxy on 127.0.0.1:0. :meth:`FaultProxy.inject` queues a fault
for the next ``count`` requests whose path starts with a prefix:

* ``error``: answer with an AWS JSON error (status, ``x-amzn-ErrorType`` header,
  ``{"message": ...}`` body), as the SESv2 REST-JSON protocol does;
* ``drop``: close the connection without answering;
* ``delay``: say nothing for ``delay_s`` seconds, then close (a read timeout on the
  client side; the request never reaches moto).

Every other request is forwarded to moto unchanged. ``attempts(prefix)`` counts every
request seen (faulted or forwarded), which proves how often the app called.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: SESv2 SendEmail: POST /v2/email/outbound-emails
SEND_EMAIL = "/v2/email/outbound-emails"

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}


@dataclass
class Fault:
    prefix: str
    mode: str  # error, drop, delay
    count: int
    status: int = 400
    error_type: str = ""
    message: str = ""
    delay_s: float = 0.0


class FaultProxy:
    """The proxy; ``endpoint_url`` is what the app is pointed at."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._faults: list[Fault] = []
        self._seen: list[tuple[str, str]] = []
        self._bodies: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="fault-proxy")
        self.endpoint_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def inject(self, prefix: str, *, mode: str = "error", count: int = 1, status: int = 400,
               error_type: str = "", message: str = "injected", delay_s: float = 0.0) -> None:
        """Fault the next ``count`` requests whose path starts with ``prefix``."""
        with self._lock:
            self._faults.append(Fault(prefix, mode, count, status, error_type, message,
                                      delay_s))

    def attempts(self, prefix: str = "") -> int:
        """Requests seen whose path starts with ``prefix``."""
        with self._lock:
            return sum(1 for _, path in self._seen if path.startswith(prefix))

    def bodies(self, prefix: str) -> list[bytes]:
        """The request bodies seen (faulted or forwarded) whose path starts with
        ``prefix``, oldest first: what the app put on the wire."""
        with self._lock:
            return [body for path, body in self._bodies if path.startswith(prefix)]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self._seen.append((method, path))
            for fault in self._faults:
                if path.startswith(fault.prefix) and fault.count > 0:
                    fault.count -= 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy._bodies.append((self.path, body))
                fault = proxy._take_fault(self.command, self.path)
                if fault is not None and fault.mode == "drop":
                    self.close_connection = True
                    return
                if fault is not None and fault.mode == "delay":
                    time.sleep(fault.delay_s)
                    self.close_connection = True
                    return
                if fault is not None:
                    payload = json.dumps({"message": fault.message}).encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("x-amzn-ErrorType", fault.error_type)
                    self.send_header("x-amzn-RequestId", "fault-proxy")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(*proxy._upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_BY_HOP}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    self.send_response(answer.status)
                    for key, value in answer.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _relay

        return Handler
