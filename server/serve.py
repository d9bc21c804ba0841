"""Running the server: the listening socket, uvicorn, and the start-up banner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import faults
from .api import create_asgi_app
from .app import DIR_IN_USE, App
from .backups import RestoreReady
from .backups.restore import Outcome, read_journal, swap_in

LISTEN_FD_ENV = "PB_LISTEN_FD"  # set for a re-exec'd process: the socket it inherits
RESTORE_ERROR_ENV = "PB_RESTORE_ERROR"  # set for a re-exec'd process whose swap failed early


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def listening_socket(address: str) -> socket.socket:
    """The server socket: inherited through ``PB_LISTEN_FD`` after a re-exec, else a new one."""
    inherited = os.environ.get(LISTEN_FD_ENV)
    if inherited:
        sock = socket.socket(fileno=int(inherited))
        sock.set_inheritable(True)
        return sock
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it a response written in two parts waits ~40 ms for the delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def superuser_hint(data_dir: Path) -> str:
    python = sys.executable
    try:
        python = os.path.relpath(python) if not os.path.relpath(python).startswith("..") else python
    except ValueError:
        pass
    return f"{shlex.quote(python)} -m server superuser upsert EMAIL PASSWORD --dir {shlex.quote(str(data_dir))}"


def _restart(keep_fd: int, ready: RestoreReady, root: Path) -> None:
    """Swap the verified backup in and re-execute this process, listening socket included."""
    faults.point("restore-stopped")
    try:
        swap_in(root, ready.new_dir, ready.key, ready.started_at, ready.verified, ready.safety)
    except Exception:
        # The journal written by swap_in lets the next start undo a partial swap.
        logging.getLogger("server").exception("the restore swap failed")
        if read_journal(root) is None:
            os.environ[RESTORE_ERROR_ENV] = json.dumps({"key": ready.key, "startedAt": ready.started_at})
    os.environ[LISTEN_FD_ENV] = str(keep_fd)
    sys.stdout.flush()
    sys.stderr.flush()
    faults.point("restore-before-exec")
    os.execv(sys.executable, sys.orig_argv)


class _Server(uvicorn.Server):
    """uvicorn's server, whose main loop also wakes up when asked to stop for a restore.

    uvicorn looks at ``should_exit`` every 0.1 s; a restore waits for that before it swaps, so
    ``stop`` wakes the loop at once instead. The loop is otherwise uvicorn's own."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)

    def stop(self) -> None:
        self.should_exit = True
        if self._wake is not None:
            self._wake.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's graceful shutdown, except that a connection accepted but not yet read is served.

        uvicorn closes every connection with no request in progress, including one whose first
        request is still unread in its buffer: that client sees a reset instead of an answer,
        although the listening socket lives on for the re-exec. So: stop accepting (new clients
        wait in the backlog for the next process), let such connections have their request read
        for up to ``FIRST_REQUEST_GRACE`` (it is then answered with ``Connection: close``), and
        only then shut down as uvicorn does."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_REQUEST_GRACE
        while loop.time() < deadline and any(_unread_request(c) for c in list(self.server_state.connections)):
            await asyncio.sleep(0.005)
        # From here uvicorn's own shutdown (0.55), but polling every 5 ms where it sleeps 0.1 s
        # (once unconditionally, then per poll): a restore's downtime is this wait, so it ends as
        # soon as the last response is out, not up to 0.2 s later.
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
                    await asyncio.sleep(0.005)
                for server in self.servers:
                    await server.wait_closed()
        except TimeoutError:
            logging.getLogger("server").error("Cancel %s running task(s), timeout graceful shutdown exceeded",
                                              len(self.server_state.tasks))
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()


# Seconds. The wait ends as soon as every such connection has its request read, so a restore pays
# it only for a client that connects and sends nothing. 0.25 s proved too short for a client
# starved of CPU (tests/test_load.py: 200 clients in one Python process beside the server).
FIRST_REQUEST_GRACE = 1.0


def _unread_request(connection: object) -> bool:
    """A connection without a request in progress that is new, or holds part of its next request."""
    if not isinstance(connection, H11Protocol):
        return False
    if connection.cycle is not None and not connection.cycle.response_complete:
        return False  # in progress: uvicorn lets it finish
    return connection.conn.their_http_version is None or bool(connection.conn.trailing_data[0])


def serve(address: str, data_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    core = App(data_dir)
    try:
        sock = listening_socket(address)
    except (ValueError, OverflowError, OSError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SystemExit(f"Error: cannot listen on {address}: {reason}") from None
    # uvicorn closes its socket when it stops; this duplicate keeps the port listening (clients
    # queue in the backlog) while a restore swaps the data and the process re-executes itself.
    if not core.backups.lock.hold_server():  # (App.start holds it; said here without a traceback)
        raise SystemExit(f"Error: {DIR_IN_USE}")
    keep_fd = os.dup(sock.fileno())
    os.set_inheritable(keep_fd, True)
    restore_error = os.environ.pop(RESTORE_ERROR_ENV, None)
    if restore_error:
        failed = json.loads(restore_error)
        core.backups.record_restore_outcome(Outcome(failed["key"], failed["startedAt"], False,
                                                    "the data could not be swapped; the previous data was kept"))
    host, port = sock.getsockname()[:2]
    base = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"

    async def banner() -> None:
        # Runs once the core has started (in the lifespan), so start-up work is done only once.
        print(f"Server started at {base}\n├─ REST API:  {base}/api/\n└─ Data dir:  {core.datadir.root}", flush=True)
        if not await core.has_superuser():
            print("\n(!) No superuser exists yet. Create one with:\n"
                  f"    {superuser_hint(Path(data_dir))}", flush=True)

    # proxy_headers=False: the client IP comes from the socket unless settings.trustedProxy says
    # otherwise (uvicorn would trust X-Forwarded-For from 127.0.0.1 by default).
    config = uvicorn.Config(create_asgi_app(core, on_started=banner), log_level="warning", lifespan="on", access_log=False,
                            timeout_graceful_shutdown=10, proxy_headers=False, http="h11")
    server = _Server(config)
    restores: list[RestoreReady] = []

    async def restore_ready(ready: RestoreReady) -> None:
        restores.append(ready)
        server.stop()  # graceful: in-flight requests finish, then the lifespan closes the core

    core.backups.on_restore_ready = restore_ready
    server.run(sockets=[sock])
    if restores:
        _restart(keep_fd, restores[0], core.datadir.root)
