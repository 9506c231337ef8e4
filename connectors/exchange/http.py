"""A small HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies), for REST and control.

The WebSocket port answers plain GETs too (through websockets' ``process_request``), but websockets
refuses request bodies, so POSTs of the control API need this server.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

from tickcast.logs import get_logger

log = get_logger("exchange")

MAX_BODY = 1 << 20
MAX_LINE = 16 << 10

Handler = Callable[[str, str, dict, dict, bytes, str], Awaitable[tuple[int, list[tuple[str, str]], bytes]]]


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    parts = urlsplit(target)
    return unquote(parts.path) or "/", parse_qs(parts.query, keep_blank_values=True)


class HttpServer:
    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0):
        self.handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        ip = peer[0] if peer else "?"
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._write(writer, 414, [], b"request line too long\n", close=True)
                    return
                if not line:
                    return
                try:
                    method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
                except ValueError:
                    await self._write(writer, 400, [], b"bad request line\n", close=True)
                    return
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                if "transfer-encoding" in headers:
                    await self._write(writer, 411, [], b"chunked bodies are not supported: send Content-Length\n",
                                      close=True)
                    return
                try:
                    length = int(headers.get("content-length", "0") or 0)
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY:
                    await self._write(writer, 413, [], b"bad or too large Content-Length\n", close=True)
                    return
                body = await reader.readexactly(length) if length else b""
                path, query = split_target(target)
                try:
                    status, hdrs, out = await self.handler(method.upper(), path, query, headers, body, ip)
                except Exception:  # a bug must not take the server down: answer and log it
                    log.exception("http handler failed", extra={"path": path})
                    status, hdrs, out = 500, [("Content-Type", "text/plain")], b"internal error\n"
                close = version.upper() == "HTTP/1.0" or headers.get("connection", "").lower() == "close"
                await self._write(writer, status, hdrs, out, close=close, head=method.upper() == "HEAD")
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _write(writer, status, headers, body: bytes, close: bool = False, head: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {reason(status)}"]
        names = {k.lower() for k, _ in headers}
        if "content-type" not in names:
            headers = [*headers, ("Content-Type", "text/plain; charset=utf-8")]
        for k, v in headers:
            lines.append(f"{k}: {v}")
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: close" if close else "Connection: keep-alive")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
        await writer.drain()
