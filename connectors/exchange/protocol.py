"""Bybit v5 public WebSocket wire format: topics, acknowledgements, errors and data messages.

Message text is produced by hand (not ``json.dumps`` of a dict) so that the key order is exactly
Bybit's, channel by channel, as the real recording shows:

* ``orderbook.{50,200,1000}``: ``topic, type, ts, data{s,b,a,u,seq}, cts``;
  ``orderbook.1`` puts ``ts`` before ``type``.
* ``publicTrade``: ``topic, type, ts, data[{T,s,S,v,p,L,i,BT,RPI,seq}]``.
* ``tickers``: ``topic, type, data{...}, cs, ts``.
* ``kline``: ``topic, data[{start,end,interval,open,close,high,low,volume,turnover,confirm,timestamp}],
  ts, type``.
* linear acks carry ``"req_id":""`` when the request had none; spot acks then omit it and answer
  ``"ret_msg":"subscribe"``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

LINEAR_DEPTHS = (1, 50, 200, 1000)
SPOT_DEPTHS = (1, 50, 200, 1000)
KLINE_INTERVALS = {"1": 60_000, "3": 180_000, "5": 300_000, "15": 900_000, "30": 1_800_000, "60": 3_600_000,
                   "120": 7_200_000, "240": 14_400_000, "360": 21_600_000, "720": 43_200_000, "D": 86_400_000}
BOOK_INTERVAL_MS = {1: 10, 50: 20, 200: 100, 1000: 200}  # linear push cadence per depth
ARGS_CHARS_LIMIT = 21_000   # total characters of the args of one connection
SPOT_ARGS_PER_REQUEST = 10

_TOPIC = re.compile(r"^(orderbook)\.(\d+)\.([A-Z0-9]+)$|^(publicTrade|tickers)\.([A-Z0-9]+)$|"
                    r"^(kline)\.([0-9]+|D|W|M)\.([A-Z0-9]+)$")


@dataclass(frozen=True)
class Topic:
    channel: str        # orderbook | publicTrade | tickers | kline
    symbol: str
    depth: int = 0      # orderbook only
    interval: str = ""  # kline only

    @property
    def name(self) -> str:
        if self.channel == "orderbook":
            return f"orderbook.{self.depth}.{self.symbol}"
        if self.channel == "kline":
            return f"kline.{self.interval}.{self.symbol}"
        return f"{self.channel}.{self.symbol}"


def parse_topic(name: str, category: str = "linear") -> Topic | None:
    """A topic Bybit serves on ``category`` (syntax, depth and interval), or None."""
    if not isinstance(name, str):
        return None
    m = _TOPIC.match(name)
    if not m:
        return None
    if m.group(1):
        depth = int(m.group(2))
        if depth not in (LINEAR_DEPTHS if category == "linear" else SPOT_DEPTHS):
            return None
        return Topic("orderbook", m.group(3), depth=depth)
    if m.group(4):
        return Topic(m.group(4), m.group(5))
    if m.group(7) not in KLINE_INTERVALS:
        return None
    return Topic("kline", m.group(8), interval=m.group(7))


# ---------------------------------------------------------------- acknowledgements and errors

def _esc(s: str) -> str:
    return json.dumps(s)[1:-1]


def go_json_string(s: str) -> str:
    """A JSON string escaped as Go's encoding/json does (``<``, ``>``, ``&`` as \\u003c...)."""
    return json.dumps(s).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def response(category: str, *, success: bool, ret_msg: str, conn_id: str, req_id: str | None, op: str) -> str:
    """A subscribe/unsubscribe/ping response in Bybit's exact shape for the category."""
    head = f'{{"success":{"true" if success else "false"},"ret_msg":{go_json_string(ret_msg)},' \
           f'"conn_id":"{conn_id}",'
    if category == "spot":
        rid = "" if req_id in (None, "") else f'"req_id":{go_json_string(str(req_id))},'
        return f'{head}{rid}"op":{go_json_string(op)}}}'
    return f'{head}"req_id":{go_json_string("" if req_id is None else str(req_id))},"op":{go_json_string(op)}}}'


def ack(category: str, conn_id: str, req_id: str | None, op: str) -> str:
    msg = "subscribe" if (category == "spot" and op == "subscribe") else ""
    return response(category, success=True, ret_msg=msg, conn_id=conn_id, req_id=req_id, op=op)


def pong(category: str, conn_id: str, req_id: str | None) -> str:
    return response(category, success=True, ret_msg="pong", conn_id=conn_id, req_id=req_id, op="ping")


# ---------------------------------------------------------------- data messages

def levels(pairs) -> str:
    return ",".join(f'["{p}","{q}"]' for p, q in pairs)


def orderbook_msg(topic: str, typ: str, ts: int, symbol: str, bids: str, asks: str, u: int, seq: int,
                  cts: int, level1: bool = False) -> str:
    data = f'{{"s":"{symbol}","b":[{bids}],"a":[{asks}],"u":{u},"seq":{seq}}}'
    if level1:
        return f'{{"topic":"{topic}","ts":{ts},"type":"{typ}","data":{data},"cts":{cts}}}'
    return f'{{"topic":"{topic}","type":"{typ}","ts":{ts},"data":{data},"cts":{cts}}}'


def trade_item(T: int, symbol: str, side: str, v: str, p: str, L: str, i: str, seq: int) -> str:
    return (f'{{"T":{T},"s":"{symbol}","S":"{side}","v":"{v}","p":"{p}","L":"{L}","i":"{i}",'
            f'"BT":false,"RPI":false,"seq":{seq}}}')


def trade_msg(topic: str, ts: int, items: list[str]) -> str:
    return f'{{"topic":"{topic}","type":"snapshot","ts":{ts},"data":[{",".join(items)}]}}'


def ticker_msg(topic: str, typ: str, fields: list[tuple[str, str]], cs: int, ts: int) -> str:
    data = ",".join(f'"{k}":"{v}"' for k, v in fields)
    return f'{{"topic":"{topic}","type":"{typ}","data":{{{data}}},"cs":{cs},"ts":{ts}}}'


def kline_item(start: int, end: int, interval: str, o: str, c: str, h: str, lo: str, vol: str, turnover: str,
               confirm: bool, timestamp: int) -> str:
    return (f'{{"start":{start},"end":{end},"interval":"{interval}","open":"{o}","close":"{c}","high":"{h}",'
            f'"low":"{lo}","volume":"{vol}","turnover":"{turnover}","confirm":{"true" if confirm else "false"},'
            f'"timestamp":{timestamp}}}')


def kline_msg(topic: str, items: list[str], ts: int) -> str:
    return f'{{"topic":"{topic}","data":[{",".join(items)}],"ts":{ts},"type":"snapshot"}}'
