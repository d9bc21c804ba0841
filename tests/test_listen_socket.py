"""The listening socket: TCP by protocol number (asyncio sets TCP_NODELAY on accepted connections
only then; without it a keep-alive response written in two parts waits ~40 ms for a delayed ACK),
also when it is inherited by a re-executed process."""

from __future__ import annotations

import os
import socket

import pytest

from server.serve import LISTEN_FD_ENV, listening_socket


def test_a_new_listening_socket_is_tcp_by_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LISTEN_FD_ENV, raising=False)
    sock = listening_socket("127.0.0.1:0")
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        assert conn.proto == socket.IPPROTO_TCP
        conn.close()
        client.close()
    finally:
        sock.close()


def test_an_inherited_listening_socket_is_the_same_tcp_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LISTEN_FD_ENV, raising=False)
    original = listening_socket("127.0.0.1:0")
    kept = os.dup(original.fileno())
    monkeypatch.setenv(LISTEN_FD_ENV, str(kept))
    inherited = listening_socket("ignored:1")
    try:
        assert inherited.fileno() == kept
        assert inherited.getsockname() == original.getsockname()
        assert inherited.proto == socket.IPPROTO_TCP
        original.close()  # the port stays open through the duplicate
        client = socket.create_connection(inherited.getsockname())
        conn, _ = inherited.accept()
        conn.close()
        client.close()
    finally:
        inherited.close()
