"""One keep-alive HTTP/1.1 connection to the sidecar, used by one thread at a time.

Why not urllib3 (or requests on top of it): in the worker's threads pool, every syscall that
releases the GIL is a hand-off between twenty threads, and the sidecar call is most of a job's
own work. urllib3 makes nine syscalls a call (a liveness poll, two blocking-mode switches,
headers and body in two writes, a poll before each read and write); this makes four (one write,
one read, and the poll before each that a socket timeout costs), and checks liveness only on a
connection idle for a while. The response is parsed by httptools (llhttp, the C parser uvicorn
uses): http.client's parser builds a file object per response and reads its headers with the
email package, which cost more of the worker's one GIL than the rest of the call.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class ConnectFailed(OSError):
    """No connection could be made: nothing was sent."""


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    body: bytes


class SidecarConnection:
    # A connection used within this many seconds is taken to be alive (servers and load
    # balancers keep idle connections for many seconds: Puma 20); an older one is checked.
    IDLE_CHECK = 1.0

    def __init__(self, url: str, connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._sock: socket.socket | None = None
        self._used_at = 0.0

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Reply:
        """Send one request and read the whole response.

        Raises ConnectFailed (nothing sent), TimeoutError (no answer within `read_timeout`),
        or another OSError or http.client.HTTPException (the connection broke).
        """
        sock = self._connected()
        try:
            sock.sendall(self._request(path, body, headers))
            reply, keep_alive = _read_reply(sock)
        except BaseException:
            self.close()  # in an unknown state: the next call starts afresh
            raise
        if not keep_alive:
            self.close()
        self._used_at = time.monotonic()
        return reply

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _request(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [
            f"POST {self.prefix}{path} HTTP/1.1",
            f"Host: {self.host_header}",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body

    def _connected(self) -> socket.socket:
        idle = time.monotonic() - self._used_at > self.IDLE_CHECK
        if self._sock is not None and idle and _closed_by_peer(self._sock):
            self.close()
        if self._sock is None:
            try:
                sock = socket.create_connection((self.host, self.port), self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._tls is not None:
                    sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except OSError as exc:
                raise ConnectFailed(f"{exc.__class__.__name__}: {exc}") from exc
            sock.settimeout(self.read_timeout)
            self._sock = sock
        return self._sock


class _Response:
    """httptools' callbacks for one response; a 1xx answer before it is read and dropped."""

    __slots__ = (
        "chunks",
        "complete",
        "delimited",
        "headers_done",
        "keep_alive",
        "parser",
        "reason",
    )

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.on_message_begin()

    def on_message_begin(self) -> None:
        self.reason, self.chunks = b"", []
        self.complete = self.delimited = self.headers_done = self.keep_alive = False

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.delimited = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        # Only known here: the parser forgets it once the callback returns.
        self.keep_alive = self.parser.should_keep_alive()


READ_SIZE = 65536


def _read_reply(sock: socket.socket) -> tuple[Reply, bool]:
    """Read one response: (the reply, whether the connection may be used again)."""
    response = _Response()
    parser = response.parser
    try:
        while not (response.complete and parser.get_status_code() >= 200):
            data = sock.recv(READ_SIZE)
            if not data:
                if response.headers_done and not response.delimited:
                    break  # a body that ends with the connection (no length, not chunked)
                raise http.client.RemoteDisconnected("the sidecar closed the connection")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise http.client.HTTPException(f"bad HTTP response: {exc}") from None
    finally:
        response.parser = None  # no reference cycle left for the garbage collector
    reply = Reply(
        parser.get_status_code(), response.reason.decode("latin-1"), b"".join(response.chunks)
    )
    return reply, response.keep_alive


def valid_header_value(value: str) -> bool:
    """What this connection can send as a header value: printable ASCII."""
    return value.isascii() and value.isprintable()


def _closed_by_peer(sock: socket.socket) -> bool:
    # An idle keep-alive connection has nothing to read unless the server closed it.
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
