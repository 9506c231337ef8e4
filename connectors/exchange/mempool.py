"""A mempool.space-compatible feed (BTC) and a litecoinspace-like one (LTC), driven by a seeded model.

Wire shapes follow mempool.space's backend (``backend/src/api/websocket-handler.ts``, read for the
formats only):

* WebSocket ``/api/v1/ws``: ``{"action":"want","data":["stats","mempool-blocks","blocks"]}``. A newly
  wanted ``stats`` answers ``mempoolInfo``, ``vBytesPerSecond``, ``fees`` at once, a newly wanted
  ``mempool-blocks`` answers ``mempool-blocks``, ``blocks`` the recent blocks. On every mempool
  change (every 2 s here) a client wanting ``stats`` gets ``mempoolInfo``, ``vBytesPerSecond``,
  ``transactions`` and ``fees``; one wanting ``mempool-blocks`` gets the projected blocks; a mined
  block is pushed as ``block`` to clients wanting ``blocks``. ``{"action":"ping"}`` answers
  ``{"pong": true}``. The server joins the top-level keys as ``"key": value`` with ``", "`` (as
  ``serializeResponse`` does) and closes the socket on a message it cannot parse.
* ``mempoolInfo`` is bitcoind's ``getmempoolinfo`` (``size`` = tx count, ``bytes`` = vsize,
  ``total_fee`` in coins); a projected block is ``{blockSize, blockVSize, nTx, totalFees, medianFee,
  feeRange}``; ``fees`` is ``{fastestFee, halfHourFee, hourFee, economyFee, minimumFee}`` (sat/vB).
* REST ``/api/mempool``: ``{count, vsize, total_fee, fee_histogram: [[feerate, vsize], ...]}`` (feerate
  descending, Electrum style), ``/api/v1/fees/recommended``, ``/api/v1/fees/mempool-blocks``,
  ``/api/blocks/tip/height``.

The model: transactions arrive as a Poisson stream (rate drifting slowly), fee rates log-normal with a
high-fee tail, sizes log-normal; blocks are found as a Poisson process (600 s BTC, 150 s LTC) and take
the highest fee rates up to 1,000,000 vB. Not modelled: the difficulty adjustment (``da``), RBF, CPFP.
"""
from __future__ import annotations

import json
import math
import random
from decimal import Decimal

BLOCK_VSIZE = 1_000_000
UPDATE_MS = 2_000

COINS = {
    # tx/s, median fee rate (sat/vB), mean vsize, block interval (s), initial tx count
    "BTC": {"rate": 4.5, "fee_median": 3.0, "vsize": 260, "block_s": 600, "init": 45_000, "height": 915_000, "unit": 1e8},
    "LTC": {"rate": 0.35, "fee_median": 1.2, "vsize": 300, "block_s": 150, "init": 120, "height": 3_020_000, "unit": 1e8},
}


def js_num(x) -> str:
    """A number as JavaScript's JSON.stringify writes it (no ``.0`` on integers, no exponent < 1e21)."""
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return "null"
    if float(x).is_integer() and abs(x) < 1e21:
        return str(int(x))
    r = repr(float(x))
    if "e" in r or "E" in r:
        r = format(Decimal(r), "f")
    return r


def js_dumps(v) -> str:
    """JSON.stringify: compact, JS number formatting, insertion order."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{js_dumps(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(js_dumps(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if v is None:
        return "null"
    return js_num(v)


def serialize_response(parts: dict[str, str]) -> str:
    """mempool.space's ``serializeResponse``: already-serialized values zipped into one object."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in parts.items() if v is not None) + "}"


class MempoolModel:
    """The mempool of one coin in virtual time (ms): fee-rate buckets of 0.1 sat/vB."""

    def __init__(self, coin: str = "BTC", seed: int = 1, start_ms: int = 0):
        if coin not in COINS:
            raise ValueError(f"coin must be one of {sorted(COINS)}")
        self.coin = coin
        self.cfg = COINS[coin]
        self.rng = random.Random(f"{seed}:mempool:{coin}")
        self.t = start_ms - start_ms % UPDATE_MS
        self.buckets: dict[int, list[int]] = {}   # rate*10 -> [count, vsize, fee]
        self.rate_mult = 1.0
        self.height = self.cfg["height"]
        self.blocks: list[dict] = []
        self.latest: list[dict] = []
        self.recent_vsize: list[tuple[int, int]] = []  # (t, vsize) of the last minute's arrivals
        self.next_block = self.t + self._block_gap()
        for _ in range(self.cfg["init"]):
            self._add_tx(self.t, record=False)
        self.version = 0

    def _block_gap(self) -> int:
        return max(1_000, int(self.rng.expovariate(1.0 / self.cfg["block_s"]) * 1000))

    def _add_tx(self, t: int, record: bool = True) -> None:
        rng = self.rng
        med = self.cfg["fee_median"] * (5.0 if rng.random() < 0.03 else 1.0)
        rate = max(1.0, round(med * math.exp(0.9 * rng.gauss(0.0, 1.0)), 1))
        vsize = max(110, int(self.cfg["vsize"] * math.exp(0.6 * rng.gauss(0.0, 1.0))))
        fee = math.ceil(rate * vsize)
        b = self.buckets.setdefault(round(rate * 10), [0, 0, 0])
        b[0] += 1
        b[1] += vsize
        b[2] += fee
        if record:
            self.recent_vsize.append((t, vsize))
            value = int(self.cfg["unit"] * math.exp(rng.gauss(-3.0, 2.0)))
            self.latest.append({"txid": f"{rng.getrandbits(256):064x}", "fee": fee, "vsize": vsize, "value": value,
                                "rate": round(fee / vsize, 4)})
            self.latest = self.latest[-6:]

    def _mine(self, t: int) -> dict:
        room = BLOCK_VSIZE
        n = vs = fees = 0
        rates = []
        for key in sorted(self.buckets, reverse=True):
            if room <= 0:
                break
            cnt, vsize, fee = self.buckets[key]
            if vsize <= room:
                take_n, take_v, take_f = cnt, vsize, fee
                del self.buckets[key]
            else:
                frac = room / vsize
                take_n = max(1, int(cnt * frac))
                take_v = int(vsize * take_n / cnt)
                take_f = int(fee * take_n / cnt)
                self.buckets[key] = [cnt - take_n, vsize - take_v, fee - take_f]
            room -= take_v
            n, vs, fees = n + take_n, vs + take_v, fees + take_f
            rates.append(key / 10)
        self.height += 1
        block = {"id": f"{self.rng.getrandbits(256):064x}", "height": self.height, "timestamp": t // 1000,
                 "tx_count": n + 1, "size": int(vs * 1.6), "weight": vs * 4,
                 "extras": {"totalFees": fees, "medianFee": rates[len(rates) // 2] if rates else 0,
                            "feeRange": [min(rates), max(rates)] if rates else [0, 0]}}
        self.blocks = (self.blocks + [block])[-8:]
        return block

    def advance(self, now_ms: int) -> list[tuple[str, object]]:
        """Run to ``now_ms``: ``("update", None)`` per 2 s step and ``("block", block)`` per block found."""
        events: list[tuple[str, object]] = []
        rng = self.rng
        while self.t + UPDATE_MS <= now_ms:
            self.t += UPDATE_MS
            self.rate_mult = max(0.3, min(3.0, self.rate_mult * math.exp(rng.gauss(0.0, 0.02))
                                          + 0.01 * (1.0 - self.rate_mult)))
            lam = self.cfg["rate"] * self.rate_mult * UPDATE_MS / 1000.0
            k, p, lim = 0, 1.0, math.exp(-lam)
            while True:
                p *= rng.random()
                if p < lim:
                    break
                k += 1
            for _ in range(k):
                self._add_tx(self.t)
            self.recent_vsize = [(t, v) for t, v in self.recent_vsize if t > self.t - 60_000]
            while self.t >= self.next_block:
                events.append(("block", self._mine(self.next_block)))
                self.next_block += self._block_gap()
            self.version += 1
            events.append(("update", None))
        return events

    # ---- state in mempool.space's shapes
    def totals(self) -> tuple[int, int, int]:
        n = vs = fee = 0
        for cnt, vsize, f in self.buckets.values():
            n, vs, fee = n + cnt, vs + vsize, fee + f
        return n, vs, fee

    def mempool_info(self) -> dict:
        n, vs, fee = self.totals()
        return {"loaded": True, "size": n, "bytes": vs, "usage": vs * 7, "total_fee": round(fee / 1e8, 8),
                "maxmempool": 300_000_000, "mempoolminfee": 0.00001, "minrelaytxfee": 0.00001,
                "incrementalrelayfee": 0.00001, "unbroadcastcount": 0, "fullrbf": True}

    def vbytes_per_second(self) -> int:
        return int(sum(v for _, v in self.recent_vsize) / 60)

    def projected_blocks(self, count: int = 8) -> list[dict]:
        blocks = []
        cur = {"vsize": 0, "n": 0, "fees": 0, "rates": []}
        for key in sorted(self.buckets, reverse=True):
            cnt, vsize, fee = self.buckets[key]
            while cnt > 0:
                room = BLOCK_VSIZE - cur["vsize"]
                if len(blocks) == count - 1:
                    room = vsize  # the last projected block holds the rest, like mempool.space's
                if vsize <= room:
                    tn, tv, tf = cnt, vsize, fee
                else:
                    tn = max(1, int(cnt * room / vsize))
                    tv, tf = int(vsize * tn / cnt), int(fee * tn / cnt)
                cur["vsize"] += tv
                cur["n"] += tn
                cur["fees"] += tf
                cur["rates"].append((key / 10, tv))
                cnt, vsize, fee = cnt - tn, vsize - tv, fee - tf
                if cur["vsize"] >= BLOCK_VSIZE and len(blocks) < count - 1:
                    blocks.append(cur)
                    cur = {"vsize": 0, "n": 0, "fees": 0, "rates": []}
        if cur["n"]:
            blocks.append(cur)
        out = []
        for i, b in enumerate(blocks):
            rates = b["rates"]  # descending
            total = b["vsize"]
            med, acc = rates[-1][0], 0
            for r, v in rates:
                acc += v
                if acc >= total / 2:
                    med = r
                    break
            k = 8 if i == 0 else 4
            asc = sorted(r for r, _ in rates)
            fee_range = [asc[min(len(asc) - 1, int(j * (len(asc) - 1) / (k - 1)))] for j in range(k)]
            out.append({"blockSize": int(total * 1.6), "blockVSize": total, "nTx": b["n"], "totalFees": b["fees"],
                        "medianFee": med, "feeRange": fee_range})
        return out

    def recommended_fees(self) -> dict:
        pb = self.projected_blocks(3)
        minimum = 1
        fastest = max(minimum, math.ceil(pb[0]["medianFee"])) if pb else minimum
        half = max(minimum, math.ceil(pb[1]["medianFee"])) if len(pb) > 1 else minimum
        hour = max(minimum, math.ceil(pb[2]["medianFee"])) if len(pb) > 2 else minimum
        half, hour = min(half, fastest), min(hour, half)
        return {"fastestFee": fastest, "halfHourFee": half, "hourFee": hour,
                "economyFee": min(2 * minimum, hour), "minimumFee": minimum}

    def fee_histogram(self) -> list[list]:
        hist = []
        for key in sorted(self.buckets, reverse=True):
            hist.append([key / 10, self.buckets[key][1]])
        return hist

    def rest_mempool(self) -> dict:
        n, vs, fee = self.totals()
        return {"count": n, "vsize": vs, "total_fee": fee, "fee_histogram": self.fee_histogram()}


class MempoolClient:
    """One WebSocket client's subscriptions (``want``) and the messages it gets."""

    WANTABLE = ("blocks", "mempool-blocks", "live-2h-chart", "stats", "tomahawk")

    def __init__(self):
        self.wants: set[str] = set()

    def handle(self, model: MempoolModel, text: str) -> str | None:
        """The answer to one client message (None: nothing to send). Raises ValueError on bad JSON."""
        msg = json.loads(text)
        if not isinstance(msg, dict):
            raise TypeError("not an object")
        parts: dict[str, str] = {}
        if msg.get("action") == "want" and isinstance(msg.get("data"), list):
            new = {w for w in self.WANTABLE if w in msg["data"] and w not in self.wants}
            self.wants = {w for w in self.WANTABLE if w in msg["data"]}
            if "blocks" in new:
                parts["blocks"] = js_dumps(model.blocks)
            if "mempool-blocks" in new:
                parts["mempool-blocks"] = js_dumps(model.projected_blocks())
            if "stats" in new:
                parts["mempoolInfo"] = js_dumps(model.mempool_info())
                parts["vBytesPerSecond"] = js_dumps(model.vbytes_per_second())
                parts["fees"] = js_dumps(model.recommended_fees())
        if msg.get("action") == "init":
            return init_data(model)
        if msg.get("action") == "ping":
            parts["pong"] = "true"
        return serialize_response(parts) if parts else None

    def update(self, model: MempoolModel, cache: dict[str, str]) -> str | None:
        parts: dict[str, str] = {}
        if "stats" in self.wants:
            parts["mempoolInfo"] = cache["mempoolInfo"]
            parts["vBytesPerSecond"] = cache["vBytesPerSecond"]
            parts["transactions"] = cache["transactions"]
            parts["fees"] = cache["fees"]
        if "mempool-blocks" in self.wants:
            parts["mempool-blocks"] = cache["mempool-blocks"]
        return serialize_response(parts) if parts else None

    def block(self, block: dict, cache: dict[str, str]) -> str | None:
        if "blocks" not in self.wants:
            return None
        parts = {"block": js_dumps(block)}
        if "stats" in self.wants:
            parts["mempoolInfo"] = cache["mempoolInfo"]
            parts["fees"] = cache["fees"]
        return serialize_response(parts)


def update_cache(model: MempoolModel) -> dict[str, str]:
    """The serialized parts of one mempool change, shared by all clients."""
    return {"mempoolInfo": js_dumps(model.mempool_info()), "vBytesPerSecond": js_dumps(model.vbytes_per_second()),
            "transactions": js_dumps(model.latest), "fees": js_dumps(model.recommended_fees()),
            "mempool-blocks": js_dumps(model.projected_blocks())}


def init_data(model: MempoolModel) -> str:
    c = update_cache(model)
    return serialize_response({"backend": '"none"', "mempoolInfo": c["mempoolInfo"],
                               "vBytesPerSecond": c["vBytesPerSecond"], "blocks": js_dumps(model.blocks),
                               "mempool-blocks": c["mempool-blocks"], "transactions": c["transactions"],
                               "fees": c["fees"]})
