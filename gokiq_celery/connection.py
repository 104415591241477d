"""One keep-alive HTTP/1.1 connection to the sidecar, used by one thread at a time.

Why not urllib3 (or requests on top of it): in the worker's threads pool, every syscall that
releases the GIL is a hand-off between twenty threads, and the sidecar call is most of a job's
own work. urllib3 makes nine syscalls a call (a liveness poll, two blocking-mode switches,
headers and body in two writes, a poll before each read and write); this makes four (one write,
one read, and the poll before each that a socket timeout costs), and checks liveness only on a
connection idle for a while. The response is parsed by the standard library's http.client.
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
            response = http.client.HTTPResponse(sock, method="POST")
            response.begin()
            data = response.read()
        except BaseException:
            self.close()  # in an unknown state: the next call starts afresh
            raise
        if response.will_close:
            self.close()
        self._used_at = time.monotonic()
        return Reply(response.status, response.reason, data)

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


def valid_header_value(value: str) -> bool:
    """What this connection can send as a header value: printable ASCII."""
    return value.isascii() and value.isprintable()


def _closed_by_peer(sock: socket.socket) -> bool:
    # An idle keep-alive connection has nothing to read unless the server closed it.
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
