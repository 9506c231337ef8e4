"""Bybit v5 public WebSocket messages -> typed events (Avro record dicts of ``schemas/avro``).

Pure and synchronous: no I/O, no clock (the receive time is passed in), so the same raw message
always gives the same events. One ``BybitParser`` per gateway keeps the little state the protocol
needs: the merged ticker of each symbol (deltas carry only the fields that changed) and the recent
trade ids (dedupe on ``i``).

An event is ``(record name, record dict)``; ``gw_seq`` is left at -1 for the publisher to assign.
Prices and sizes stay the exchange's decimal strings, verbatim, after a check that each one is a
finite, non-negative decimal; anything else raises :class:`ParseError` with a stable ``kind`` that
becomes the dead letter's ``error_kind``.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from tickcast.config import VALID_DEPTHS
from tickcast.logs import get_logger

try:  # orjson is 2x faster than the stdlib on these messages; both give the same objects
    from orjson import JSONDecodeError as _JSONError
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is a dependency
    from json import JSONDecodeError as _JSONError
    from json import loads as _loads

Event = tuple[str, dict]
log = get_logger("gateway.parse")

# a finite, non-negative decimal as Bybit writes it ("65114.20", "0", "0.002"); ASCII digits only
# (``\d`` would also accept Arabic-Indic or full-width digits, which Decimal() then parses)
_DEC = re.compile(r"[0-9]+(?:\.[0-9]+)?")
# a list of them joined by "|": one C-level match checks a whole side of a book
_DECS = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:\|[0-9]+(?:\.[0-9]+)?)*")
# funding rates are signed
_SIGNED_DEC = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_INT_STR = re.compile(r"[0-9]+")

BOOK_CHANNEL = "orderbook"
TRADE_CHANNEL = "publicTrade"
TICKER_CHANNEL = "tickers"
KLINE_CHANNEL = "kline"
CHANNELS = (BOOK_CHANNEL, TRADE_CHANNEL, TICKER_CHANNEL, KLINE_CHANNEL)


class ParseError(ValueError):
    """A message that cannot become events; ``kind`` is the dead letter's error_kind."""

    def __init__(self, kind: str, reason: str, *, topic: str | None = None, symbol: str | None = None):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.topic = topic
        self.symbol = symbol


def decode(raw: str | bytes) -> dict:
    """The JSON object of one WebSocket message, or ParseError(malformed_json / not_an_object)."""
    try:
        msg = _loads(raw)
    except (_JSONError, ValueError, TypeError) as exc:
        raise ParseError("malformed_json", f"not valid JSON: {exc}") from None
    if type(msg) is not dict:
        raise ParseError("not_an_object", f"expected a JSON object, got {type(msg).__name__}")
    return msg


def _bad_decimal(value: Any, field: str, *, signed: bool = False) -> ParseError:
    """The most precise error for a value that is not a valid decimal string."""
    if not isinstance(value, str):
        return ParseError("wrong_type", f"{field}: expected a decimal string, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except ValueError:
        return ParseError("invalid_decimal", f"{field}: {value!r} is not a decimal number")
    if not math.isfinite(number):
        return ParseError("not_finite", f"{field}: {value!r} is not finite")
    if number < 0 and not signed:
        kind = "negative_size" if "sz" in field or "size" in field.lower() or field in ("v", "volume") \
            else "negative_price" if "px" in field or "price" in field.lower() or field == "p" else "negative_value"
        return ParseError(kind, f"{field}: {value!r} is negative")
    return ParseError("invalid_decimal", f"{field}: {value!r} is not a plain decimal string")


def check_decimal(value: Any, field: str) -> str:
    if type(value) is str and _DEC.fullmatch(value):
        return value
    raise _bad_decimal(value, field)


def check_signed(value: Any, field: str) -> str:
    if type(value) is str and _SIGNED_DEC.fullmatch(value):
        return value
    raise _bad_decimal(value, field, signed=True)


_LONG = 1 << 63  # Avro long: [-2**63, 2**63)
_INT32 = 1 << 31  # Avro int


def _in_range(value: int, field: str, bound: int = _LONG) -> int:
    """An int the wire contract can carry (JSON ints are unbounded; Avro's are not)."""
    if -bound <= value < bound:
        return value
    raise ParseError("out_of_range", f"{field}: {value} does not fit a {bound.bit_length()}-bit integer")


def _int(value: Any, field: str) -> int:
    if type(value) is int:
        return _in_range(value, field)
    raise ParseError("wrong_type", f"{field}: expected an integer, got {type(value).__name__} {value!r}")


def _opt_int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    return _int(value, field)


def levels(side: Any, name: str) -> tuple[list[str], list[str]]:
    """``[[price, size], ...]`` -> (prices, sizes), every string checked."""
    if type(side) is not list:
        raise ParseError("wrong_type", f"{name}: expected a list of [price, size], got {type(side).__name__}")
    px: list[str] = []
    sz: list[str] = []
    for lvl in side:
        if type(lvl) is not list or len(lvl) != 2:
            raise ParseError("wrong_type", f"{name}: level {lvl!r} is not a [price, size] pair")
        px.append(lvl[0])
        sz.append(lvl[1])
    if px:
        try:
            jp, js = "|".join(px), "|".join(sz)
            # the separator count rules out a value that itself contains "|"
            ok = (_DECS.fullmatch(jp) is not None and _DECS.fullmatch(js) is not None
                  and jp.count("|") == js.count("|") == len(px) - 1)
        except TypeError:
            ok = False
        if not ok:  # find the offending value for a precise reason
            for p, s in zip(px, sz):
                check_decimal(p, f"{name}_px")
                check_decimal(s, f"{name}_sz")
            raise ParseError("invalid_decimal", f"{name}: a level is not a pair of decimal strings")
    return px, sz


# Bybit ticker field -> (Ticker record field, kind of value)
TICKER_FIELDS: dict[str, tuple[str, str]] = {
    "lastPrice": ("last_price", "dec"),
    "markPrice": ("mark_price", "dec"),
    "indexPrice": ("index_price", "dec"),
    "openInterest": ("open_interest", "dec"),
    "openInterestValue": ("open_interest_value", "dec"),
    "fundingRate": ("funding_rate", "signed"),
    "nextFundingTime": ("next_funding_time", "int"),
    "fundingIntervalHour": ("funding_interval_hour", "int32"),
    "bid1Price": ("bid1_price", "dec"),
    "bid1Size": ("bid1_size", "dec"),
    "ask1Price": ("ask1_price", "dec"),
    "ask1Size": ("ask1_size", "dec"),
    "volume24h": ("volume_24h", "dec"),
    "turnover24h": ("turnover_24h", "dec"),
}
TICKER_STATE_FIELDS = tuple(v[0] for v in TICKER_FIELDS.values())


def _ticker_value(key: str, kind: str, value: Any) -> Any:
    if value is None or value == "":  # Bybit sends "" for fields that do not apply
        return None
    if kind == "dec":
        return check_decimal(value, key)
    if kind == "signed":
        return check_signed(value, key)
    # integers arrive as strings ("1786320000000", "8"); accept JSON ints too
    bound = _INT32 if kind == "int32" else _LONG
    if type(value) is int:
        return _in_range(value, key, bound)
    if type(value) is str and _INT_STR.fullmatch(value):
        return _in_range(int(value), key, bound)
    raise ParseError("wrong_type", f"{key}: expected an integer string, got {value!r}")


class BybitParser:
    """Turns decoded Bybit v5 public messages into typed events.

    ``symbols``: the subscribed symbols (messages for others are dead letters), or None for any.
    ``kline_intervals``: the kline intervals the gateway publishes (``market.kline.1m``: "1").
    """

    def __init__(self, venue: str = "bybit.linear", symbols: Iterable[str] | None = None, *,
                 kline_intervals: Iterable[str] = ("1",), trade_id_memory: int = 50_000):
        self.venue = venue
        self.symbols = frozenset(symbols) if symbols is not None else None
        self.kline_intervals = frozenset(kline_intervals)
        self.trade_id_memory = trade_id_memory
        self.tickers: dict[str, dict] = {}  # symbol -> merged Ticker state (record field names)
        self._trade_ids: dict[str, OrderedDict] = {}
        self.duplicate_trades = 0
        self.book_gaps = 0  # deltas whose u is not the previous u + 1 (passed on: the book assembler resyncs)
        self.book_repeats = 0  # deltas whose u is not above the previous u (a resend; the assembler ignores it)
        self._last_u: dict[str, int] = {}
        self._topics: dict[str, tuple[str, str, Any]] = {}  # topic -> (channel, symbol, arg) cache

    # -- topics ---------------------------------------------------------------------------------
    def route(self, topic: Any) -> tuple[str, str, Any]:
        if type(topic) is not str:  # before the cache: a list or dict is not even hashable
            raise ParseError("wrong_type", f"topic must be a string, got {topic!r}")
        cached = self._topics.get(topic)
        if cached is not None:
            return cached
        parts = topic.split(".")
        channel = parts[0]
        if channel == BOOK_CHANNEL and len(parts) == 3:
            if not parts[1].isdigit() or int(parts[1]) not in VALID_DEPTHS:
                raise ParseError("unknown_topic", f"order-book depth {parts[1]!r} is not one of {VALID_DEPTHS}",
                                 topic=topic)
            route = (channel, parts[2], int(parts[1]))
        elif channel == KLINE_CHANNEL and len(parts) == 3:
            if parts[1] not in self.kline_intervals:
                raise ParseError("unknown_topic", f"kline interval {parts[1]!r} is not subscribed", topic=topic)
            route = (channel, parts[2], parts[1])
        elif channel in (TRADE_CHANNEL, TICKER_CHANNEL) and len(parts) == 2:
            route = (channel, parts[1], None)
        else:
            raise ParseError("unknown_topic", f"unknown or unsupported topic {topic!r}", topic=topic)
        if self.symbols is not None and route[1] not in self.symbols:
            raise ParseError("unknown_symbol", f"symbol {route[1]!r} is not subscribed", topic=topic,
                             symbol=route[1])
        if len(self._topics) < 10_000:
            self._topics[topic] = route
        return route

    # -- messages -------------------------------------------------------------------------------
    def events(self, msg: dict, recv_ts: int) -> list[Event]:
        """Events of one decoded data message (one that has a ``topic``)."""
        topic = msg.get("topic")
        channel, symbol, arg = self.route(topic)
        try:
            ts = msg["ts"]
            if type(ts) is not int:
                raise ParseError("wrong_type", f"ts: expected integer milliseconds, got {ts!r}")
            data = msg["data"]
            if channel == BOOK_CHANNEL:
                return [self._book(msg, data, symbol, arg, ts, recv_ts)]
            if channel == TRADE_CHANNEL:
                return self._trades(data, symbol, ts, recv_ts)
            if channel == TICKER_CHANNEL:
                return self._ticker(msg, data, symbol, ts, recv_ts)
            return self._klines(data, symbol, arg, ts, recv_ts)
        except ParseError as exc:
            exc.topic = exc.topic or topic
            exc.symbol = exc.symbol or symbol
            raise
        except KeyError as exc:
            raise ParseError("missing_field", f"missing field {exc.args[0]!r}", topic=topic, symbol=symbol) from None
        except (TypeError, AttributeError, IndexError) as exc:
            raise ParseError("wrong_type", f"unexpected structure: {exc}", topic=topic, symbol=symbol) from None

    def _book(self, msg: dict, data: dict, symbol: str, depth: int, ts: int, recv_ts: int) -> Event:
        kind = msg["type"]
        if data["s"] != symbol:
            raise ParseError("symbol_mismatch", f"data.s {data['s']!r} differs from the topic's symbol")
        u = _int(data["u"], "u")
        bid_px, bid_sz = levels(data["b"], "bid")
        ask_px, ask_sz = levels(data["a"], "ask")
        rec = {
            "symbol": symbol, "venue": self.venue, "exchange_ts": ts, "recv_ts": recv_ts, "gw_seq": -1,
            "depth": depth, "update_id": u, "cross_seq": _int(data["seq"], "seq"),
            "match_ts": _opt_int(msg.get("cts"), "cts"),
            "bid_px": bid_px, "bid_sz": bid_sz, "ask_px": ask_px, "ask_sz": ask_sz,
        }
        # u == 1: the exchange restarted and this is a full book whatever the type says
        if kind == "snapshot" or u == 1:
            self._last_u[symbol] = u
            return ("OrderBookSnapshot", rec)
        if kind != "delta":
            raise ParseError("unknown_type", f"order-book message type {kind!r} is neither snapshot nor delta")
        last = self._last_u.get(symbol)
        if last is not None and u != last + 1 and not (depth == 1 and u == last):
            # published as is either way: the book assembler drops a repeat and resyncs on a gap
            if u <= last:
                self.book_repeats += 1
                log.warning("order-book update id repeated or older (published as is; the book assembler "
                            "ignores it)", extra={"symbol": symbol, "u": u, "previous_u": last,
                                                  "counts": {"repeats": self.book_repeats}})
            else:
                self.book_gaps += 1
                log.warning("order-book update id gap (published as is; the book assembler resyncs)",
                            extra={"symbol": symbol, "u": u, "previous_u": last, "counts": {"gaps": self.book_gaps}})
        self._last_u[symbol] = max(u, last or 0)
        return ("OrderBookDelta", rec)

    def _trades(self, data: list, symbol: str, ts: int, recv_ts: int) -> list[Event]:
        if type(data) is not list:
            raise ParseError("wrong_type", f"publicTrade data must be a list, got {type(data).__name__}")
        seen = self._trade_ids.get(symbol)
        if seen is None:
            seen = self._trade_ids[symbol] = OrderedDict()
        out: list[Event] = []
        fresh: list[str] = []
        for t in data:
            if t["s"] != symbol:
                raise ParseError("symbol_mismatch", f"trade s {t['s']!r} differs from the topic's symbol")
            tid = t["i"]
            if type(tid) is int:  # spot trade ids are numbers
                tid = str(tid)
            elif type(tid) is not str or not tid:
                raise ParseError("wrong_type", f"trade id i must be a non-empty string, got {tid!r}")
            side = t["S"]
            if side != "Buy" and side != "Sell":
                raise ParseError("invalid_side", f"taker side S must be Buy or Sell, got {side!r}")
            bt = t.get("BT", False)
            rpi = t.get("RPI")
            if type(bt) is not bool or (rpi is not None and type(rpi) is not bool):
                raise ParseError("wrong_type", f"BT/RPI must be booleans, got {bt!r}/{rpi!r}")
            tick = t.get("L")
            if tick is not None and type(tick) is not str:
                raise ParseError("wrong_type", f"L must be a string, got {tick!r}")
            if tid in seen or tid in fresh:
                self.duplicate_trades += 1
                continue
            fresh.append(tid)
            out.append(("Trade", {
                "symbol": symbol, "venue": self.venue, "exchange_ts": ts, "recv_ts": recv_ts, "gw_seq": -1,
                "trade_ts": _int(t["T"], "T"), "trade_id": tid, "side": side,
                "price": check_decimal(t["p"], "p"), "size": check_decimal(t["v"], "v"),
                "tick_direction": tick, "block_trade": bt, "rpi": rpi,
                "cross_seq": _opt_int(t.get("seq"), "seq"),
            }))
        # remember the ids only once the whole message is valid (a dead-lettered message leaves no trace)
        for tid in fresh:
            seen[tid] = None
        while len(seen) > self.trade_id_memory:
            seen.popitem(last=False)
        return out

    def _ticker(self, msg: dict, data: dict, symbol: str, ts: int, recv_ts: int) -> list[Event]:
        kind = msg.get("type", "snapshot")  # spot tickers are always snapshots
        if type(data) is not dict:
            raise ParseError("wrong_type", f"tickers data must be an object, got {type(data).__name__}")
        if data.get("symbol", symbol) != symbol:
            raise ParseError("symbol_mismatch", f"data.symbol {data.get('symbol')!r} differs from the topic's")
        prev = self.tickers.get(symbol)
        if kind == "snapshot":
            state = dict.fromkeys(TICKER_STATE_FIELDS)
        elif kind == "delta":
            if prev is None:
                raise ParseError("ticker_delta_before_snapshot",
                                 "a tickers delta arrived before any snapshot: the merged state is unknown")
            state = dict(prev)
        else:
            raise ParseError("unknown_type", f"tickers message type {kind!r} is neither snapshot nor delta")
        for key, value in data.items():
            spec = TICKER_FIELDS.get(key)
            if spec is not None:
                state[spec[0]] = _ticker_value(key, spec[1], value)
        cs = _opt_int(msg.get("cs"), "cs")
        if prev is None:
            changed = [f for f in TICKER_STATE_FIELDS if state[f] is not None]
        else:
            changed = [f for f in TICKER_STATE_FIELDS if state[f] != prev[f]]
        self.tickers[symbol] = state
        rec = {"symbol": symbol, "venue": self.venue, "exchange_ts": ts, "recv_ts": recv_ts, "gw_seq": -1,
               "is_snapshot": kind == "snapshot", "changed": changed, **state, "cross_seq": cs}
        out: list[Event] = [("Ticker", rec)]
        rate = state["funding_rate"]
        if rate is not None and (prev is None or rate != prev["funding_rate"]
                                 or state["next_funding_time"] != prev["next_funding_time"]):
            out.append(("Funding", {
                "symbol": symbol, "venue": self.venue, "exchange_ts": ts, "recv_ts": recv_ts, "gw_seq": -1,
                "kind": "ticker", "funding_rate": rate, "next_funding_time": state["next_funding_time"],
                "funding_interval_hour": state["funding_interval_hour"],
            }))
        return out

    def _klines(self, data: list, symbol: str, interval: str, ts: int, recv_ts: int) -> list[Event]:
        if type(data) is not list:
            raise ParseError("wrong_type", f"kline data must be a list, got {type(data).__name__}")
        out: list[Event] = []
        for k in data:
            confirm = k["confirm"]
            if type(confirm) is not bool:
                raise ParseError("wrong_type", f"confirm must be a boolean, got {confirm!r}")
            if k["interval"] != interval:
                raise ParseError("interval_mismatch", f"candle interval {k['interval']!r} differs from the topic's")
            turnover = k.get("turnover")
            out.append(("Kline", {
                "symbol": symbol, "venue": self.venue, "exchange_ts": ts, "recv_ts": recv_ts, "gw_seq": -1,
                "interval": interval, "start_ts": _int(k["start"], "start"), "end_ts": _int(k["end"], "end"),
                "open": check_decimal(k["open"], "open"), "high": check_decimal(k["high"], "high"),
                "low": check_decimal(k["low"], "low"), "close": check_decimal(k["close"], "close"),
                "volume": check_decimal(k["volume"], "volume"),
                "turnover": None if turnover is None else check_decimal(turnover, "turnover"),
                "confirm": confirm,
            }))
        return out


def control_kind(msg: dict) -> str | None:
    """'pong', 'subscribe', 'unsubscribe', ... for Bybit's control replies; None for data messages."""
    op = msg.get("op")
    if op is None:
        return None
    if op == "ping" or op == "pong" or msg.get("ret_msg") == "pong":
        return "pong"
    return str(op)
