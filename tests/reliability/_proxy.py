"""A loopback TCP proxy the tests can cut: refuse connections, or swallow traffic like a partition."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["TcpProxy", "through"]


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``stop``/``start`` and ``partition``/``heal`` cut it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._forwarding = True
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._guard = threading.Lock()

    # -- control -------------------------------------------------------------------

    def start(self) -> TcpProxy:
        """Listen (again, on the same port) and forward."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        self._forwarding = True
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the port and every connection: clients see refused or reset connections."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._close_all()

    def partition(self) -> None:
        """Keep every socket open but move no bytes: clients must rely on their timeouts."""
        self._forwarding = False

    def heal(self) -> None:
        """Drop the connections that lived through the partition and forward again."""
        self._close_all()
        self._forwarding = True

    # -- internals -------------------------------------------------------------------

    def _close_all(self) -> None:
        with self._guard:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._guard:
            self._sockets.add(sock)

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._track(client)
            if not self._forwarding:
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self._track(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                if not self._forwarding:
                    time.sleep(0.05)
                    if a.fileno() < 0 or b.fileno() < 0:
                        return
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if not self._forwarding:
                        return  # bytes that arrived as the partition began: drop the connection
                    peers[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


def through(url: str, port: int) -> str:
    """``url`` pointed at 127.0.0.1:``port`` (the proxy), keeping user, path and options."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    query = dict(parse_qsl(parts.query))
    if parts.scheme.startswith("mongodb"):
        query["directConnection"] = "true"  # never let the driver discover the real port
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))
