"""A WebSocket client transport for a high message rate: websockets' Sans-I/O protocol on an asyncio
``Protocol``.

``websockets.asyncio.client`` hands each frame to a coroutine through a queue and a future, which
costs about as much per message as parsing it. Here websockets' own ``ClientProtocol`` (handshake,
frame parsing, control frames, closing handshake, masking of what we send) runs directly in
``data_received``: every complete text message of the chunk just read goes synchronously to the
callback, in order, and the event loop is involved once per chunk instead of once per message.
Fragmented messages are reassembled; pings are answered by the protocol; binary messages are
passed on decoded with ``surrogateescape`` so their bytes survive into a dead letter.

    stream = await FrameStream.open(url, on_text, timeout=10)
    await stream.send('{"op":"ping"}')
    await stream.wait_closed()   # returns when the connection ends (raises what ended it, if anything)
"""
from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri


class StreamClosed(ConnectionError):
    pass


class FrameStream(asyncio.Protocol):
    """One client WebSocket connection; ``on_text(str)`` is called for every message received."""

    def __init__(self, url: str, on_text: Callable[[str], None], on_data: Callable[[], None] | None = None,
                 max_size: int = 2 ** 24):
        self.uri = parse_uri(url)
        self.proto = ClientProtocol(self.uri, max_size=max_size)
        self.on_text = on_text
        self.on_data = on_data or (lambda: None)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self._parts: list[bytes] = []
        self._part_opcode: Opcode | None = None
        self.error: BaseException | None = None

    @classmethod
    async def open(cls, url: str, on_text: Callable[[str], None], *, on_data: Callable[[], None] | None = None,
                   timeout: float = 10.0, max_size: int = 2 ** 24) -> FrameStream:
        """Connect (TCP, TLS for wss://) and complete the opening handshake within ``timeout``."""
        loop = asyncio.get_running_loop()
        stream = cls(url, on_text, on_data, max_size)
        uri = stream.uri
        ctx = ssl.create_default_context() if uri.secure else None
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: stream, uri.host, uri.port, ssl=ctx,
                                         server_hostname=uri.host if ctx else None)
            try:
                await stream.opened
            except BaseException:
                stream.abort()
                raise
        return stream

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        self.on_data()
        try:
            for event in self.proto.events_received():
                if isinstance(event, Response):
                    self._handshake_done()
                    continue
                op = event.opcode
                if op is Opcode.TEXT or op is Opcode.BINARY:
                    if event.fin:
                        self._deliver(op, event.data)
                    else:
                        self._part_opcode, self._parts = op, [event.data]
                elif op is Opcode.CONT and self._part_opcode is not None:
                    self._parts.append(event.data)
                    if event.fin:
                        op, data_ = self._part_opcode, b"".join(self._parts)
                        self._part_opcode, self._parts = None, []
                        self._deliver(op, data_)
        except Exception as exc:  # noqa: BLE001 - a failing callback ends this connection, reported by wait_closed
            self.error = exc
            self.abort()
            return
        self._flush()  # pongs, the closing handshake
        if self.proto.close_expected():
            self.transport.close()

    def _deliver(self, op: Opcode, payload: bytes) -> None:
        if op is Opcode.TEXT:
            text = payload.decode("utf-8", "surrogateescape")
        else:  # Bybit sends text only: keep the bytes recoverable for the dead letter
            text = bytes(payload).decode("utf-8", "surrogateescape")
        self.on_text(text)

    def _handshake_done(self) -> None:
        if self.opened.done():
            return
        if self.proto.handshake_exc is not None:
            self.opened.set_exception(self.proto.handshake_exc)
        else:
            self.opened.set_result(None)

    def eof_received(self) -> bool:
        self.proto.receive_eof()
        self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.proto.receive_eof()
        except Exception:  # noqa: BLE001, S110 - already closed: nothing left to parse
            pass
        err = self.error or exc
        if err is None and self.opened.done() and self.proto.close_rcvd is None:
            err = StreamClosed("the connection ended without a closing handshake (1006)")
        if not self.opened.done():
            self.opened.set_exception(err or StreamClosed("connection closed during the handshake"))
        if not self.closed.done():
            if err is not None:
                self.closed.set_exception(err)
            else:
                self.closed.set_result(self.proto.close_code)

    # -- use --------------------------------------------------------------------------------------
    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    @property
    def open_(self) -> bool:
        return self.proto.state is State.OPEN and self.transport is not None and not self.transport.is_closing()

    async def send(self, text: str) -> None:
        if not self.open_:
            raise StreamClosed("the WebSocket is not open")
        self.proto.send_text(text.encode())
        self._flush()

    async def close(self, timeout: float = 2.0) -> None:
        """The closing handshake, then the TCP connection (aborted after ``timeout``)."""
        if self.transport is None:
            return
        if self.proto.state is State.OPEN:
            self.proto.send_close(1000)
            self._flush()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except (TimeoutError, Exception):  # noqa: BLE001 - closing: whatever happens, the socket goes
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self):
        """Wait for the end of the connection; raises what ended it, if it was an error."""
        return await asyncio.shield(self.closed)
