"""Mempool feeds -> MempoolStats records, published under the market symbol each chain informs.

- :class:`MempoolSpaceFeed`: mempool.space (BTC) and litecoinspace.org (LTC), which share one API.
  WebSocket ``/api/v1/ws`` with ``{"action":"want","data":["stats","mempool-blocks"]}`` pushes
  ``mempoolInfo`` (count, vsize, total fee), ``fees`` (recommended fee rates), ``vBytesPerSecond``
  and ``mempool-blocks`` (projected blocks); REST ``/api/mempool`` adds the fee histogram, polled
  every ``rest_interval_s`` (and the only source while the socket is down).
- :class:`AlchemyPendingFeed`: Ethereum / Polygon pending transactions over Alchemy's WebSocket
  JSON-RPC (``eth_subscribe`` ``alchemy_pendingTransactions``, falling back to the standard
  ``newPendingTransactions`` hashes), aggregated per second: count, value, large transfers, gas
  price levels. Transactions are folded into the second's aggregate and never stored.

Each record goes out through the gateway's ``publish`` (so it takes the market symbol's gw_seq);
bad input goes to ``dead_letter``. Neither class touches Kafka itself.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

from connectors.bybit.ws import backoff_delay
from tickcast.logs import get_logger

log = get_logger("gateway.mempool")

# chain -> market symbol(s) it informs
CHAIN_SYMBOLS = {"BTC": ["BTCUSDT"], "LTC": ["LTCUSDT"], "ETH": ["ETHUSDT"], "POL": ["POLUSDT"]}

Publish = Callable[[str, dict], Any]
DeadLetter = Callable[..., None]


class BadInput(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _num(value: Any, field: str) -> float:
    """A finite, non-negative JSON number."""
    if type(value) not in (int, float):
        raise BadInput("wrong_type", f"{field}: expected a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)  # JSON ints are unbounded: one beyond a double is no statistic
    except OverflowError:
        raise BadInput("out_of_range", f"{field}: {str(value)[:40]}... does not fit a double") from None
    if not math.isfinite(number):
        raise BadInput("not_finite", f"{field}: {value!r} is not finite")
    if number < 0:
        raise BadInput("negative_value", f"{field}: {value!r} is negative")
    return number


def _opt_num(obj: dict, key: str, field: str) -> float | None:
    v = obj.get(key)
    return None if v is None else _num(v, field)


def _opt_int(obj: dict, key: str, field: str) -> int | None:
    v = obj.get(key)
    return None if v is None else int(_num(v, field))


async def _close_when(stop: asyncio.Event, ws) -> None:
    await stop.wait()
    await ws.close()


def ws_url_of(base_url: str) -> str:
    """https://mempool.space -> wss://mempool.space/api/v1/ws (same for http -> ws)."""
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return base + "/api/v1/ws"


class MempoolState:
    """The latest mempool.space view of one chain, merged from WebSocket pushes and REST polls."""

    def __init__(self) -> None:
        self.tx_count: int | None = None
        self.vsize: int | None = None
        self.total_fee: float | None = None
        self.fees: dict[str, float | None] = {}
        self.histogram: list[dict] = []
        self.projected_blocks: int | None = None
        self.next_block_median_fee: float | None = None

    def apply_ws(self, msg: dict) -> bool:
        """Fold one push in; True when it carried mempool statistics. Raises BadInput, and then
        changes nothing: every part is checked before any is applied (a rejected push must not
        leave half of itself in the state the next good one publishes)."""
        updates: list = []
        info = msg.get("mempoolInfo")
        if info is not None:
            if not isinstance(info, dict):
                raise BadInput("wrong_type", "mempoolInfo must be an object")
            tx_count = _opt_int(info, "size", "mempoolInfo.size")
            vsize = _opt_int(info, "bytes", "mempoolInfo.bytes")
            total_fee = _opt_num(info, "total_fee", "mempoolInfo.total_fee")  # in BTC/LTC
            updates.append({"tx_count": tx_count, "vsize": vsize,
                            **({"total_fee": total_fee} if total_fee is not None else {})})
        fees = msg.get("fees")
        if fees is not None:
            updates.append({"fees": self._fees(fees)})
        blocks = msg.get("mempool-blocks")
        if blocks is not None:
            updates.append(self._blocks(blocks))
        for u in updates:
            self.__dict__.update(u)
        return bool(updates)

    @staticmethod
    def _fees(fees: Any) -> dict[str, float | None]:
        if not isinstance(fees, dict):
            raise BadInput("wrong_type", "fees must be an object")
        return {k: _opt_num(fees, k, f"fees.{k}") for k in
                ("fastestFee", "halfHourFee", "hourFee", "economyFee", "minimumFee")}

    @staticmethod
    def _blocks(blocks: Any) -> dict:
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise BadInput("wrong_type", "mempool-blocks must be a list of objects")
        median = _opt_num(blocks[0], "medianFee", "mempool-blocks[0].medianFee") if blocks else None
        for i, b in enumerate(blocks):
            _opt_num(b, "blockVSize", f"mempool-blocks[{i}].blockVSize")
            _opt_num(b, "nTx", f"mempool-blocks[{i}].nTx")
        return {"projected_blocks": len(blocks), "next_block_median_fee": median}

    def apply_rest_mempool(self, body: Any) -> None:
        """``GET /api/mempool``: {count, vsize, total_fee (sat), fee_histogram [[rate, vsize], ...]}."""
        if not isinstance(body, dict):
            raise BadInput("wrong_type", "/api/mempool must return an object")
        hist = body.get("fee_histogram", [])
        if not isinstance(hist, list):
            raise BadInput("wrong_type", "fee_histogram must be a list")
        levels = []
        for i, lvl in enumerate(hist):
            if not isinstance(lvl, list) or len(lvl) != 2:
                raise BadInput("wrong_type", f"fee_histogram[{i}] must be [fee_rate, vsize]")
            levels.append({"fee_rate": _num(lvl[0], f"fee_histogram[{i}].fee_rate"),
                           "vsize": int(_num(lvl[1], f"fee_histogram[{i}].vsize"))})
        count = _opt_int(body, "count", "count")
        vsize = _opt_int(body, "vsize", "vsize")
        fee_sat = _opt_num(body, "total_fee", "total_fee")
        self.histogram = levels  # applied only once every part is valid
        if count is not None:
            self.tx_count = count
        if vsize is not None:
            self.vsize = vsize
        if fee_sat is not None:
            self.total_fee = fee_sat / 1e8

    def record(self, symbol: str, chain: str, venue: str, recv_ts: int) -> dict:
        f = self.fees
        return {"symbol": symbol, "venue": venue, "exchange_ts": recv_ts // 1000, "recv_ts": recv_ts, "gw_seq": -1,
                "chain": chain, "tx_count": self.tx_count, "vsize": self.vsize, "total_fee": self.total_fee,
                "fee_fastest": f.get("fastestFee"), "fee_half_hour": f.get("halfHourFee"),
                "fee_hour": f.get("hourFee"), "fee_economy": f.get("economyFee"),
                "fee_minimum": f.get("minimumFee"), "fee_histogram": list(self.histogram),
                "projected_blocks": self.projected_blocks, "next_block_median_fee": self.next_block_median_fee,
                "pending_value": None, "large_transfers": None}


class MempoolSpaceFeed:
    """mempool.space-API feed of one chain (BTC: mempool.space, LTC: litecoinspace, or the local
    exchange's compatible feed)."""

    def __init__(self, base_url: str, chain: str, symbols: list[str], venue: str, publish: Publish,
                 dead_letter: DeadLetter, *, rest_interval_s: float = 30.0, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 60.0, timeout_s: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.ws_url = ws_url_of(base_url)
        self.chain = chain
        self.symbols = symbols
        self.venue = venue
        self.publish = publish
        self.dead_letter = dead_letter
        self.rest_interval_s = rest_interval_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.state = MempoolState()
        self.ws_up = False
        self.received = 0
        self.published = 0
        self.reconnects = 0
        self.source = f"gateway.mempool.{chain.lower()}"

    def _emit(self) -> None:
        recv_ts = time.time_ns() // 1000
        for sym in self.symbols:
            self.publish("MempoolStats", self.state.record(sym, self.chain, self.venue, recv_ts))
            self.published += 1

    def handle_ws(self, raw: str | bytes) -> None:
        self.received += 1
        try:
            msg = json.loads(raw)
        except ValueError as exc:
            self.dead_letter(self.source, "malformed_json", f"not valid JSON: {exc}", raw, topic=self.ws_url)
            return
        if not isinstance(msg, dict):
            self.dead_letter(self.source, "not_an_object", "expected a JSON object", raw, topic=self.ws_url)
            return
        try:
            relevant = self.state.apply_ws(msg)
        except BadInput as exc:
            self.dead_letter(self.source, exc.kind, exc.reason, raw, topic=self.ws_url)
            return
        if relevant:
            self._emit()

    async def poll_rest(self, http) -> None:
        resp = await http.get(f"{self.base_url}/api/mempool")
        resp.raise_for_status()
        try:
            self.state.apply_rest_mempool(resp.json())
            if not self.ws_up:  # the socket is down: REST keeps the statistics flowing
                fees = await http.get(f"{self.base_url}/api/v1/fees/recommended")
                fees.raise_for_status()
                self.state.fees = self.state._fees(fees.json())
                self._emit()
        except (BadInput, ValueError) as exc:
            kind = exc.kind if isinstance(exc, BadInput) else "malformed_json"
            self.dead_letter(self.source, kind, str(exc), resp.content, topic=f"{self.base_url}/api/mempool")

    async def run(self, stop: asyncio.Event) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=self.timeout_s) as http:
            poller = asyncio.create_task(self._rest_loop(http, stop))
            try:
                await self._ws_loop(stop)
            finally:
                poller.cancel()

    async def _rest_loop(self, http, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_rest(http)
            except Exception as exc:  # noqa: BLE001 - a failed poll is retried at the next interval
                log.warning("mempool REST poll failed", extra={"chain": self.chain, "error": repr(exc)})
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.rest_interval_s)
            except TimeoutError:
                pass

    async def _ws_loop(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        rng = random.Random()
        attempt = 0
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.timeout_s):
                    ws = await connect(self.ws_url, max_size=2 ** 24, close_timeout=2)
            except Exception as exc:  # noqa: BLE001 - every connect failure is retried with backoff
                log.warning("mempool WebSocket connect failed", extra={"chain": self.chain, "error": repr(exc)})
            else:
                attempt = 0
                try:
                    await ws.send(json.dumps({"action": "want", "data": ["stats", "mempool-blocks"]}))
                    self.ws_up = True
                    log.info("mempool feed connected", extra={"chain": self.chain, "url": self.ws_url})
                    closer = asyncio.create_task(_close_when(stop, ws))
                    try:
                        async for raw in ws:
                            self.handle_ws(raw)
                    finally:
                        closer.cancel()
                except Exception as exc:  # noqa: BLE001 - whatever ended the socket, reconnect
                    if not stop.is_set():
                        log.warning("mempool WebSocket lost", extra={"chain": self.chain, "error": repr(exc)})
                finally:
                    self.ws_up = False
                    await ws.close()
                self.reconnects += 1
            if stop.is_set():
                break
            delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, rng)
            attempt += 1
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass


# --- Alchemy pending transactions --------------------------------------------------------------


class PendingAggregate:
    """One second of pending transactions: folded, never stored."""

    __slots__ = ("count", "gas_gwei", "large", "value_wei", "values_known")

    def __init__(self) -> None:
        self.count = 0
        self.value_wei = 0
        self.large = 0
        self.gas_gwei: list[float] = []
        self.values_known = False

    def add(self, tx: Any, large_wei: int) -> None:
        """A full transaction object (alchemy_pendingTransactions) or a hash (newPendingTransactions)."""
        if isinstance(tx, str):
            if not tx.startswith("0x"):
                raise BadInput("wrong_type", f"pending transaction hash {tx[:80]!r} is not hex")
            self.count += 1
            return
        if not isinstance(tx, dict):
            raise BadInput("wrong_type", f"pending transaction must be an object or a hash, got {type(tx).__name__}")
        value = _hex(tx.get("value", "0x0"), "value")
        gas = tx.get("gasPrice") or tx.get("maxFeePerGas")
        gwei = _hex(gas, "gasPrice") / 1e9 if gas is not None else None
        self.count += 1
        self.values_known = True
        self.value_wei += value
        if value >= large_wei:
            self.large += 1
        if gwei is not None:
            self.gas_gwei.append(gwei)


def _hex(value: Any, field: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise BadInput("wrong_type", f"{field}: expected a 0x hex quantity, got {value!r}")
    try:
        number = int(value, 16)
    except ValueError:
        raise BadInput("invalid_number", f"{field}: {value!r} is not hexadecimal") from None
    if number >= 1 << 256:  # EVM quantities are uint256
        raise BadInput("out_of_range", f"{field}: {value[:40]}... exceeds 256 bits")
    return number


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def aggregate_record(agg: PendingAggregate, second: int, symbol: str, chain: str, venue: str,
                     recv_ts: int) -> dict:
    """MempoolStats of one second ``[second, second + 1)``; gas levels in gwei."""
    gas = sorted(agg.gas_gwei)
    return {"symbol": symbol, "venue": venue, "exchange_ts": (second + 1) * 1000, "recv_ts": recv_ts, "gw_seq": -1,
            "chain": chain, "tx_count": agg.count, "vsize": None, "total_fee": None,
            "fee_fastest": _quantile(gas, 0.9), "fee_half_hour": _quantile(gas, 0.5), "fee_hour": None,
            "fee_economy": _quantile(gas, 0.1), "fee_minimum": gas[0] if gas else None, "fee_histogram": [],
            "projected_blocks": None, "next_block_median_fee": _quantile(gas, 0.5),
            "pending_value": agg.value_wei / 1e18 if agg.values_known else None,
            "large_transfers": agg.large if agg.values_known else None}


class AlchemyPendingFeed:
    """Pending transactions of one chain over Alchemy's WebSocket, aggregated per second."""

    def __init__(self, ws_url: str, chain: str, symbols: list[str], publish: Publish, dead_letter: DeadLetter, *,
                 venue: str = "alchemy", large_transfer: float = 100.0, backoff_base_s: float = 1.0,
                 backoff_max_s: float = 60.0, timeout_s: float = 10.0, clock: Callable[[], float] = time.time):
        self.ws_url = ws_url
        self.chain = chain
        self.symbols = symbols
        self.venue = venue
        self.publish = publish
        self.dead_letter = dead_letter
        self.large_wei = int(large_transfer * 10 ** 18)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.method: str | None = None
        self.second: int | None = None
        self.agg = PendingAggregate()
        self.received = 0
        self.published = 0
        self.source = f"gateway.alchemy.{chain.lower()}"

    def _redacted(self) -> str:
        # the API key is the last path segment of Alchemy URLs: keep it out of logs and dead letters
        head, _, _ = self.ws_url.rpartition("/")
        return head + "/***"

    def roll(self, now: float | None = None) -> None:
        """Publish every finished second up to ``now`` (quiet seconds too: zero is information)."""
        now = self.clock() if now is None else now
        current = int(now)
        if self.second is None:
            self.second = current
            return
        while self.second < current:
            recv_ts = int(now * 1_000_000)
            for sym in self.symbols:
                self.publish("MempoolStats", aggregate_record(self.agg, self.second, sym, self.chain, self.venue,
                                                              recv_ts))
                self.published += 1
            self.agg = PendingAggregate()
            self.second += 1

    def handle(self, raw: str | bytes, now: float | None = None) -> None:
        self.received += 1
        self.roll(now)
        try:
            msg = json.loads(raw)
        except ValueError as exc:
            self.dead_letter(self.source, "malformed_json", f"not valid JSON: {exc}", raw, topic=self._redacted())
            return
        if not isinstance(msg, dict):
            self.dead_letter(self.source, "not_an_object", "expected a JSON object", raw, topic=self._redacted())
            return
        if msg.get("method") != "eth_subscription":
            return  # responses are handled by the subscribe step
        params = msg.get("params")
        if not isinstance(params, dict) or "result" not in params:
            self.dead_letter(self.source, "missing_field", "eth_subscription without params.result", raw,
                             topic=self._redacted())
            return
        try:
            self.agg.add(params["result"], self.large_wei)
        except BadInput as exc:
            self.dead_letter(self.source, exc.kind, exc.reason, raw, topic=self._redacted())

    async def _subscribe(self, ws) -> str:
        """alchemy_pendingTransactions (full objects), else newPendingTransactions (hashes)."""
        attempts = [("alchemy_pendingTransactions", [{"hashesOnly": False}]), ("newPendingTransactions", [])]
        for i, (method, extra) in enumerate(attempts, start=1):
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": i, "method": "eth_subscribe",
                                      "params": [method, *extra]}))
            async with asyncio.timeout(self.timeout_s):
                while True:
                    reply = json.loads(await ws.recv())
                    if isinstance(reply, dict) and reply.get("id") == i:
                        break
            if isinstance(reply.get("result"), str):
                return method
            log.warning("eth_subscribe refused", extra={"chain": self.chain, "method": method,
                                                        "error": str(reply.get("error"))[:200]})
        raise RuntimeError("the node refused both pending-transaction subscriptions")

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect

        rng = random.Random()
        attempt = 0
        ticker = asyncio.create_task(self._tick(stop))
        try:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(self.timeout_s):
                        ws = await connect(self.ws_url, max_size=2 ** 24, close_timeout=2)
                except Exception as exc:  # noqa: BLE001 - every connect failure is retried with backoff
                    log.warning("Alchemy connect failed", extra={"chain": self.chain, "url": self._redacted(),
                                                                 "error": type(exc).__name__})
                else:
                    try:
                        self.method = await self._subscribe(ws)
                        attempt = 0
                        self.second = None  # start aggregating on a fresh second
                        log.info("Alchemy pending-transaction feed subscribed", extra={
                            "chain": self.chain, "method": self.method})
                        closer = asyncio.create_task(_close_when(stop, ws))
                        try:
                            async for raw in ws:
                                self.handle(raw)
                        finally:
                            closer.cancel()
                    except Exception as exc:  # noqa: BLE001 - whatever ended the socket, reconnect
                        if not stop.is_set():
                            log.warning("Alchemy feed lost", extra={"chain": self.chain, "error": repr(exc)})
                    finally:
                        if self.method is not None:
                            self.roll()  # publish the seconds that finished
                            if self.agg.count:
                                log.warning("Alchemy feed: the second in progress at the disconnect is not published",
                                            extra={"chain": self.chain, "counts": {"transactions": self.agg.count}})
                        self.method = None
                        self.agg = PendingAggregate()
                        await ws.close()
                if stop.is_set():
                    break
                delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, rng)
                attempt += 1
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            ticker.cancel()

    async def _tick(self, stop: asyncio.Event) -> None:
        """Close seconds even when no transaction arrives."""
        while not stop.is_set():
            await asyncio.sleep(1.0 - (self.clock() % 1.0) + 0.005)
            if self.method is not None:
                self.roll()
