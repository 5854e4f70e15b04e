"""A loopback HTTP server for the download tests that misbehaves on demand."""
from __future__ import annotations

import base64
import email.utils
import hashlib
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    """One request as the server saw it."""
    path: str
    range: str | None
    authorization: str | None
    status: int
    body_bytes: int
    if_range: str | None = None
    query: str = ""


class FlakyServer(ThreadingHTTPServer):
    """Serves ``files`` {url path: bytes} on 127.0.0.1 (or ``host``, "::1" for IPv6) and
    misbehaves on demand.

    auth     (user, password): 401 until a request carries them
    corrupt  {path}: flip the first byte of what is served
    validator "etag" (a strong ETag naming the version served) or "last-modified" (a
             Last-Modified date per version and no ETag, as many static file servers send)
    redirects {path: other path or URL}: answer 301 to the other path on this server (or the URL),
             before asking for credentials (as an http -> https redirect does)
    script   {path: [action, ...]}: each request for path takes the next action, if any:
             ("drop", n)      send n bytes of the body, then cut the connection
             ("ignore_range",) answer a Range request with the whole file (200)
             ("ignore_if_range",) answer a Range request from the file as it is now (206), even
                              when If-Range names another version
             ("status", code) answer with that error status
             ("trickle", n, s) send n bytes every s seconds
             ("no_length", n) send no Content-Length (the body ends when the connection does)
                              and only n bytes of the body, None: all of it
    """
    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1"):
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.auth: tuple[str, str] | None = None
        self.corrupt: set[str] = set()
        self.redirects: dict[str, str] = {}
        self.validator = "etag"
        self.script: dict[str, list[tuple]] = {}
        self.log: list[Served] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}"

    def bytes_sent(self, path: str) -> int:
        """Bytes of the file itself sent for ``path`` (error pages do not count)."""
        return sum(s.body_bytes for s in self.log if s.path == path and s.status in (200, 206))

    def next_action(self, path: str) -> tuple:
        with self.lock:
            queue = self.script.get(path)
            return queue.pop(0) if queue else ("serve",)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FlakyServer

    def log_message(self, *args):
        pass

    def _record(self, path, status, body_bytes):
        with self.server.lock:
            self.server.log.append(Served(path, self.headers.get("Range"),
                                          self.headers.get("Authorization"), status, body_bytes,
                                          self.headers.get("If-Range"),
                                          urllib.parse.urlsplit(self.path).query))

    # Each response is logged before it is sent, so the log follows the client's order.
    def _reply(self, path, status, headers=(), body=b""):
        self._record(path, status, len(body))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path in srv.redirects:
            to = srv.redirects[path]
            return self._reply(path, 301, [("Location", to if "://" in to else srv.url + to)])
        if srv.auth is not None:
            token = base64.b64encode(f"{srv.auth[0]}:{srv.auth[1]}".encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                return self._reply(path, 401, [("WWW-Authenticate", 'Basic realm="test"')], b"no")
        if path not in srv.files:
            return self._reply(path, 404, body=b"not found")
        action = srv.next_action(path)
        if action[0] == "status":
            return self._reply(path, action[1], body=b"failing on purpose")
        body = srv.files[path]
        if path in srv.corrupt:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        digest = hashlib.sha256(body).hexdigest()
        if srv.validator == "etag":
            field, etag = "ETag", '"' + digest[:16] + '"'  # a strong ETag: the version served
        else:
            field, etag = "Last-Modified", email.utils.formatdate(int(digest[:8], 16), usegmt=True)
        start, status, headers = 0, 200, [(field, etag)]
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if if_range and if_range != etag and action[0] != "ignore_if_range":
            wanted = None  # another version than the client holds: the whole file (RFC 9110 13.1.5)
        if wanted and action[0] != "ignore_range":
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                return self._reply(path, 416, [("Content-Range", f"bytes */{len(body)}")])
            status, headers = 206, [(field, etag), ("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")]
        payload = body[start:]
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if action[0] == "no_length":
            sent = payload if action[1] is None else payload[:action[1]]
            self._record(path, status, len(sent))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(sent)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if action[0] == "drop":
            self._record(path, status, min(action[1], len(payload)))
            self.wfile.write(payload[:action[1]])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action[0] == "trickle":
            sent = 0
            try:
                for i in range(0, len(payload), action[1]):
                    self.wfile.write(payload[i:i + action[1]])
                    self.wfile.flush()
                    sent += len(payload[i:i + action[1]])
                    time.sleep(action[2])
            except OSError:             # the client went away
                pass
            self._record(path, status, sent)        # (logged last: only then is the count known)
            return
        self._record(path, status, len(payload))
        self.wfile.write(payload)
