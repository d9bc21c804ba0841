"""The HTTP protocol layer of ``server.serve`` (uvicorn's httptools protocol on uvloop, issue 19):

- the restore drain's view of a connection (``_unread_request``): a new connection and one
  holding part of its next request are waited for; one with a request in progress is uvicorn's
  to finish; an idle keep-alive connection is not waited for; draining closes idle connections
  and makes every other request its connection's last;
- the response head is held back and written with the first body part in one call, except before
  the response starts (``100 Continue``) and for HEAD; a close writes a held head first;
- against a real server over a raw socket: ``Expect: 100-continue`` is answered before the body
  is sent, a response arrives whole, and pipelined requests are answered in order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from conftest import ServerProcess
from server.serve import _HeadHeldTransport, _Protocol, _unread_request


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8090), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts: Any) -> None:
        self.calls.append(("writelines", tuple(bytes(p) for p in parts)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def tiny_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def protocol() -> tuple[_Protocol, FakeTransport]:
    config = uvicorn.Config(tiny_app, http=_Protocol, lifespan="off", log_level="warning")
    config.load()
    proto = _Protocol(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_the_drain_waits_for_new_and_partly_read_connections_only() -> None:
    proto, transport = protocol()
    assert _unread_request(proto), "a new connection may hold an unread first request"
    proto.data_received(b"GET /api/health HTTP/1.1\r\nHo")
    assert _unread_request(proto), "part of the first request"
    proto.data_received(b"st: x\r\n\r\n")
    assert not _unread_request(proto), "in progress: uvicorn's shutdown lets it finish"
    await settle()
    assert proto.cycle.response_complete
    assert not _unread_request(proto), "idle keep-alive connection: nothing to wait for"
    proto.data_received(b"GET /api/he")
    assert _unread_request(proto), "part of the next request"
    proto.data_received(b"alth HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not _unread_request(proto)
    await settle()
    answers = b"".join(b"".join(data) if kind == "writelines" else data
                       for kind, data in transport.calls if kind != "close")
    assert answers.count(b"HTTP/1.1 200 OK") == 2 and answers.count(b"\r\n\r\nok") == 2
    assert not _unread_request(object()), "not an HTTP connection of ours"


async def test_draining_closes_idle_connections_and_makes_every_other_request_the_last() -> None:
    idle, idle_transport = protocol()
    idle.data_received(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    await settle()
    new, new_transport = protocol()
    partial, partial_transport = protocol()
    partial.data_received(b"GET /api/health HTTP/1.1\r\n")
    busy, busy_transport = protocol()
    busy.data_received(b"POST /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")  # body to come
    await settle()
    for proto in (idle, new, partial, busy):
        proto.drain()
    assert idle_transport.closed, "an idle keep-alive connection is closed at once"
    assert not (new_transport.closed or partial_transport.closed or busy_transport.closed)
    assert busy.cycle.keep_alive is False
    new.data_received(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    partial.data_received(b"Host: x\r\n\r\n")
    busy.data_received(b"ping")
    await settle()
    for proto, transport in ((new, new_transport), (partial, partial_transport), (busy, busy_transport)):
        written = b"".join(b"".join(d) if k == "writelines" else d for k, d in transport.calls if k != "close")
        assert written.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in written, written
        assert transport.closed, "the answered request was the connection's last"


async def test_the_head_goes_out_with_the_body_in_one_call() -> None:
    proto, transport = protocol()
    proto.data_received(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    await settle()
    assert [kind for kind, _ in transport.calls] == ["writelines"]
    head, body = transport.calls[0][1]
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n") and body == b"ok"


class Cycle:
    def __init__(self, method: str = "GET") -> None:
        self.response_started = False
        self.scope = {"method": method}


def test_a_write_before_the_response_starts_is_not_held() -> None:
    transport, cycle = FakeTransport(), Cycle()
    held = _HeadHeldTransport(transport, cycle)
    held.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.calls == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]
    cycle.response_started = True
    held.write(b"HEAD\r\n\r\n")
    assert len(transport.calls) == 1
    held.write(b"body-1")
    held.write(b"body-2")
    assert transport.calls[1:] == [("writelines", (b"HEAD\r\n\r\n", b"body-1")), ("write", b"body-2")]


def test_a_head_response_and_a_close_write_the_head_at_once() -> None:
    transport, cycle = FakeTransport(), Cycle("HEAD")
    cycle.response_started = True
    _HeadHeldTransport(transport, cycle).write(b"HEAD-ONLY\r\n\r\n")
    assert transport.calls == [("write", b"HEAD-ONLY\r\n\r\n")]

    transport, cycle = FakeTransport(), Cycle()
    held = _HeadHeldTransport(transport, cycle)
    cycle.response_started = True
    held.write(b"HEAD\r\n\r\n")
    assert held.is_closing() is False  # other attributes are the transport's
    held.close()
    assert transport.calls == [("write", b"HEAD\r\n\r\n"), ("close", None)]


# --- against a real server --------------------------------------------------------------------------


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bytes]:
    """One response (head, body) read from ``sock``, with ``Content-Length``; the rest stays in
    ``buffer``."""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in buffer:
        assert time.monotonic() < deadline, bytes(buffer)
        chunk = sock.recv(65536)
        assert chunk, f"closed after {bytes(buffer)!r}"
        buffer.extend(chunk)
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < end + length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        buffer.extend(chunk)
    body = bytes(buffer[end:end + length])
    del buffer[:end + length]
    return head, body


@pytest.fixture()
def public_collection(server: ServerProcess, su: dict[str, str]) -> str:
    import httpx

    name = f"http_{int(time.time() * 1000) % 10**9}"
    response = httpx.post(server.url + "/api/collections", headers=su, timeout=30, json={
        "name": name, "type": "base", "createRule": "", "viewRule": "", "listRule": "",
        "fields": [{"name": "title", "type": "text"}]})
    assert response.status_code == 200, response.text
    return name


def test_expect_100_continue_is_answered_before_the_body_is_sent(server: ServerProcess, public_collection: str) -> None:
    body = json.dumps({"title": "after 100 continue"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /api/collections/{public_collection}/records HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        buffer = bytearray()
        sock.settimeout(3)  # the interim answer comes before (and without) the body
        while b"\r\n\r\n" not in buffer:
            buffer.extend(sock.recv(4096))
        assert buffer.startswith(b"HTTP/1.1 100 Continue\r\n"), bytes(buffer)
        del buffer[:buffer.index(b"\r\n\r\n") + 4]
        sock.sendall(body)
        head, answer = read_response(sock, buffer)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(answer)["title"] == "after 100 continue"


def test_pipelined_requests_are_answered_whole_and_in_order(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /api/nothing-here HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        buffer = bytearray()
        head, body = read_response(sock, buffer)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["message"] == "API is healthy."
        # HEAD: a head (with the GET's Content-Length) and no body
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in buffer:
            assert time.monotonic() < deadline
            buffer.extend(sock.recv(65536))
        end = buffer.index(b"\r\n\r\n") + 4
        assert buffer.startswith(b"HTTP/1.1 200 "), bytes(buffer)
        del buffer[:end]
        head, body = read_response(sock, buffer)
        assert head.startswith(b"HTTP/1.1 404 ") and json.loads(body)["status"] == 404
        head, body = read_response(sock, buffer)
        assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
        assert sock.recv(65536) == b"" and not buffer, "closed after the last answer"
