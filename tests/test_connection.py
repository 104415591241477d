"""SidecarConnection reading the HTTP answers a server may send (httptools parses them), over a
real TCP socket from a server that answers each request with canned bytes."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from gokiq_celery.connection import SidecarConnection


class CannedServer:
    """Answers the n-th request on any connection with `answers[n]`, then, when the answer is
    followed by None, closes that connection."""

    def __init__(self, *answers: bytes | None) -> None:
        self.answers = list(answers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while self.answers:
            conn, _ = self.listener.accept()
            self.connections += 1
            with conn:
                while self.answers:
                    if not _read_request(conn):
                        break
                    conn.sendall(self.answers.pop(0))
                    if self.answers and self.answers[0] is None:
                        self.answers.pop(0)
                        break

    def close(self) -> None:
        self.listener.close()


def _read_request(conn: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(65536)
    return True


@pytest.fixture
def serve():
    servers: list[CannedServer] = []

    def start(*answers: bytes | None) -> SidecarConnection:
        servers.append(CannedServer(*answers))
        return SidecarConnection(servers[-1].url, 2.0, 2.0)

    yield start
    for server in servers:
        server.close()


def post(conn: SidecarConnection):
    return conn.post("/jobs/execute", b'{"class":"OkJob"}', {"Content-Type": "application/json"})


def test_a_sized_answer_keeps_the_connection(serve):
    conn = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 500 Boom\r\n"
                 b"Content-Length: 4\r\n\r\nfail")  # fmt: skip
    first = post(conn)
    kept = conn._sock
    second = post(conn)
    assert (first.status, first.reason, first.body) == (200, "OK", b"ok")
    assert (second.status, second.reason, second.body) == (500, "Boom", b"fail")
    assert kept is conn._sock is not None


def test_a_chunked_answer_is_joined(serve):
    conn = serve(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert post(conn).body == b"abcde"
    assert conn._sock is not None


def test_connection_close_and_http_1_0_close_the_connection(serve):
    conn = serve(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\na",
        None,
        b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",
        None,
    )
    assert post(conn).body == b"a" and conn._sock is None
    assert post(conn).body == b"b" and conn._sock is None


def test_a_body_without_length_ends_with_the_connection(serve):
    conn = serve(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}", None)
    assert post(conn).body == b"{}"
    assert conn._sock is None


def test_an_interim_1xx_answer_is_skipped(serve):
    conn = serve(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    reply = post(conn)
    assert (reply.status, reply.body) == (200, b"ok")


def test_a_connection_closed_mid_answer_or_before_it_is_broken(serve):
    conn = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None)
    with pytest.raises(http.client.RemoteDisconnected):
        post(conn)
    assert conn._sock is None
    silent = serve(b"", None)
    with pytest.raises(ConnectionError):  # RemoteDisconnected is one
        post(silent)


def test_garbage_is_a_broken_answer_not_a_reply(serve):
    conn = serve(b"SMTP ready\r\n\r\n", None)
    with pytest.raises(http.client.HTTPException, match="bad HTTP response"):
        post(conn)
    assert conn._sock is None


def test_no_answer_within_the_read_timeout_is_a_timeout(serve):
    server = CannedServer()  # accepts (the listen backlog), never answers
    conn = SidecarConnection(server.url, 1.0, 0.2)
    with pytest.raises(TimeoutError):
        post(conn)
    server.close()
