"""The gateway's WebSocket transport (websockets' Sans-I/O protocol on an asyncio Protocol) against
a real websockets server: handshake, order, fragmented and binary messages, server pings, the
closing handshake, refused handshakes and a peer that vanishes."""
from __future__ import annotations

import asyncio
import json

import pytest

from connectors.bybit.transport import FrameStream, StreamClosed


async def serve(handler, **kw):
    from websockets.asyncio.server import serve as ws_serve

    server = await ws_serve(handler, "127.0.0.1", 0, compression=None, **kw)
    return server, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v5/public/linear"


def test_messages_arrive_in_order_fragments_binary_and_pings():
    got: list[str] = []
    pongs = []

    async def handler(ws):
        assert ws.request.path == "/v5/public/linear"
        req = json.loads(await ws.recv())
        await ws.send(json.dumps({"success": True, "op": req["op"], "req_id": req["req_id"]}))
        for i in range(2000):
            await ws.send(f'{{"n":{i}}}')
        await ws.send(['{"frag', 'mented":', 'true}'])  # one message in three frames
        await ws.send(b'{"binary":"\\xff"}')
        pongs.append(await asyncio.wait_for(await ws.ping(b"x"), 5))  # answered by the client's protocol
        await ws.send('{"last":true}')
        await ws.wait_closed()

    async def main():
        server, url = await serve(handler)
        stream = await FrameStream.open(url, got.append)
        await stream.send(json.dumps({"op": "subscribe", "req_id": "1", "args": []}))
        while not got or got[-1] != '{"last":true}':
            await asyncio.sleep(0.01)
        await stream.close()
        code = await stream.wait_closed()
        server.close()
        await server.wait_closed()
        return code

    assert asyncio.run(asyncio.wait_for(main(), 30)) == 1000
    assert got[0] == '{"success": true, "op": "subscribe", "req_id": "1"}'
    assert got[1:2001] == [f'{{"n":{i}}}' for i in range(2000)]
    assert got[2001] == '{"fragmented":true}'
    assert got[2002].encode("utf-8", "surrogateescape") == b'{"binary":"\\xff"}'
    assert pongs  # the server's ping got its pong


def test_the_server_closing_ends_the_stream_with_its_code():
    async def handler(ws):
        await ws.send("bye")
        await ws.close(code=4000, reason="maintenance")

    async def main():
        server, url = await serve(handler)
        got = []
        stream = await FrameStream.open(url, got.append)
        code = await asyncio.wait_for(stream.wait_closed(), 5)
        with pytest.raises(StreamClosed):
            await stream.send("late")
        server.close()
        return got, code

    got, code = asyncio.run(main())
    assert got == ["bye"] and code == 4000


def test_a_refused_handshake_and_a_vanished_peer_raise():
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    async def refuse(connection, request):
        return connection.respond(403, "Forbidden\n")

    async def handler(ws):
        await ws.send("hello")
        ws.transport.abort()  # no closing handshake: the TCP connection just goes

    async def main():
        server, url = await serve(lambda ws: None, process_request=refuse)
        with pytest.raises(InvalidStatus) as err:
            await FrameStream.open(url, print)
        server.close()
        server2, url2 = await serve(handler)
        got = []
        stream = await FrameStream.open(url2, got.append)
        with pytest.raises(StreamClosed, match="1006"):
            await asyncio.wait_for(stream.wait_closed(), 5)
        server2.close()
        return err.value, got

    exc, got = asyncio.run(main())
    assert "403" in str(exc) and got == ["hello"]
    assert Response  # the handshake's HTTP response type is websockets' own


def test_a_failing_callback_ends_the_connection_and_is_reported():
    async def handler(ws):
        await ws.send("one")
        await ws.send("two")
        await asyncio.sleep(1)

    def boom(text):
        if text == "two":
            raise RuntimeError("callback bug")

    async def main():
        server, url = await serve(handler)
        stream = await FrameStream.open(url, boom)
        with pytest.raises(RuntimeError, match="callback bug"):
            await asyncio.wait_for(stream.wait_closed(), 5)
        server.close()

    asyncio.run(main())


def test_connect_timeout():
    import socket

    async def main():
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)  # accepts TCP but never answers the HTTP upgrade
        port = lsock.getsockname()[1]
        with pytest.raises(TimeoutError):
            await FrameStream.open(f"ws://127.0.0.1:{port}/", print, timeout=0.5)
        lsock.close()

    asyncio.run(main())
