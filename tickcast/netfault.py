"""Network faults for tests and the soak: a TCP proxy that can cut a broker off, and a tansu broker
advertised behind that proxy.

tansu keeps its data in memory only, so a broker *process* restart loses everything: "the broker
goes away and comes back" is simulated as a network partition instead. The broker advertises the
proxy's address, so every client connection (bootstrap and the broker connections learnt from
metadata) goes through the proxy; ``cut()`` closes every connection and refuses new ones,
``restore()`` listens again on the same port.

``TcpProxy`` runs on the caller's asyncio loop; ``ProxyThread`` runs one on a loop of its own for
synchronous code (``tickcast soak``).
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from tickcast.broker import EmbeddedBroker, free_port
from tickcast.topics import TOPICS, ensure_topics


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; ``cut()`` closes every connection and refuses new
    ones (the broker is unreachable), ``restore()`` listens again on the same port."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.server = None
        self.pipes: set[asyncio.StreamWriter] = set()
        self.connections = 0  # client connections accepted so far

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def _client(self, reader, writer) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self.pipes |= {writer, up_w}

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        self.pipes -= {writer, up_w}

    @property
    def listening(self) -> bool:
        return self.server is not None and self.server.is_serving()

    async def cut(self) -> None:
        self.server.close()
        for w in list(self.pipes):
            w.transport.abort()
        self.pipes.clear()
        await self.server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    async def stop(self) -> None:
        await self.cut()


class ProxyThread:
    """A :class:`TcpProxy` on its own event loop in a daemon thread, with synchronous calls."""

    def __init__(self, target_port: int = 0, port: int | None = None):
        self.proxy = TcpProxy(target_port, port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)

    @property
    def port(self) -> int:
        return self.proxy.port

    def _call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ProxyThread:
        self._thread.start()
        self._call(self.proxy.start())
        return self

    def cut(self) -> None:
        self._call(self.proxy.cut())

    def restore(self) -> None:
        self._call(self.proxy.restore())

    @property
    def listening(self) -> bool:
        return self.proxy.listening

    def stop(self) -> None:
        if self.proxy.listening:
            self._call(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ProxiedBroker(EmbeddedBroker):
    """A tansu broker that advertises the proxy's address, so every client connection (bootstrap
    and the broker connections learnt from metadata) goes through the proxy. Topics are created
    with ``create_topics`` once the proxy forwards."""

    def __init__(self, proxy_port: int, *, log_file: Path | None = None):
        super().__init__(topics=None, log_file=log_file, advertised_port=proxy_port)
        self.proxy_port = proxy_port

    def create_topics(self) -> None:
        ensure_topics(self.bootstrap, TOPICS)
