"""`StoreProxy`: a TCP proxy on 127.0.0.1 in front of a store server (moto) that a test can freeze and cut.

`freeze()` holds every byte in both directions (requests block, as when a worker's path to the store hangs);
`thaw()` lets them through again, so a write sent during the freeze lands late; `cut()` closes every open
connection (the client sees a reset and retries). One proxy per worker: freezing it cuts off that worker alone.
"""

from __future__ import annotations

import socket
import threading


class StoreProxy:
    """Forwards 127.0.0.1:`port` to ``target`` (host, port). Use as a context manager or call `close`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="store-proxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    def cut(self) -> None:
        """Close every open connection (new ones are accepted)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _close(conn)

    def close(self) -> None:
        self._closed = True
        self.thaw()
        _close(self._listener)
        self.cut()

    def __enter__(self) -> StoreProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._open.wait()  # frozen: hold the bytes (and so the whole request) until thawed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
