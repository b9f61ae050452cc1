"""A TCP forwarder between the stack and one of its services, which can make the service unreachable:
every open connection broken and new ones refused, then reachable again on the same port. The chaos
suite puts Neo4j behind one (scenario 6), so a fault touches only its own stack and leaves the
machine's shared services running."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

from lumikb_pipeline_tests.dagster.stack import free_port


class TcpProxy:
    """Forwards `127.0.0.1:<port>` to `target` (host, port), a thread pair per connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.reachable()

    @classmethod
    def for_url(cls, url: str, default_port: int) -> TcpProxy:
        parts = urlsplit(url)
        return cls((parts.hostname or "127.0.0.1", parts.port or default_port))

    def url(self, scheme: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def reachable(self) -> None:
        """Listen (again) on the proxy's port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), name="chaos-proxy-accept", daemon=True).start()

    def unreachable(self) -> None:
        """Refuse new connections and break every open one, as a service gone from the network."""
        if self._listener is not None:
            _close(self._listener)
            self._listener = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _close(connection)

    close = unreachable

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._connections |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), name="chaos-proxy-pipe", daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections -= {source, sink}
            _close(source)
            _close(sink)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        connection.close()
