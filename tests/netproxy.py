"""A TCP proxy on loopback that behaves like a field link: slow, stalling, cut off.

Each connection through it follows the next plan of a list (the last one repeats): a `rate` in
bytes per second (0: as fast as loopback), a `cut_after` byte count after which both ends are
closed, a `stall_after` count after which nothing more is forwarded while the connection stays
open (as a link that died without a reset does). `forwarded` counts the bytes it carried.
"""

from __future__ import annotations

import socket
import threading
import time


class Proxy:
    def __init__(self, target: tuple[str, int], plans: list[dict]):
        self.target, self.plans = target, list(plans)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.forwarded = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        for s in [self.server] + self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(10)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                plan = self.plans.pop(0) if len(self.plans) > 1 else self.plans[0]
                self.connections += 1
                self._sockets += [client, upstream]
            state = {"bytes": 0, "plan": plan}
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b, state))
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        plan = state["plan"]
        started = time.monotonic()
        sent = 0
        while not self._closed.is_set():
            try:
                data = src.recv(16384)
            except OSError:
                data = b""
            if not data:
                break
            with self._lock:
                state["bytes"] += len(data)
                total = state["bytes"]
            if plan.get("cut_after") and total >= plan["cut_after"]:
                break
            if plan.get("stall_after") and total >= plan["stall_after"]:
                self._closed.wait()  # forward nothing more, close nothing
                return
            try:
                dst.sendall(data)
            except OSError:
                break
            with self._lock:
                self.forwarded += len(data)
            sent += len(data)
            if plan.get("rate"):
                ahead = sent / plan["rate"] - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
