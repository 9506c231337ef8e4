"""Instruments of the local exchange: tick and lot grids, exact decimal formatting, instruments-info.

Prices and sizes live as integers on the instrument's grid (``ticks`` of ``tickSize``, ``lots`` of
``qtyStep``) and become Bybit's decimal strings only at the edge, so every number the exchange sends
is exact. ``instruments-info`` is served from the real recorded response under ``../shared`` when it
is there (800 linear instruments, MATICUSDT absent, POLUSDT present), otherwise from a response of
the same shape generated for the MVP symbols from the facts below (taken from that real response).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import cached_property
from pathlib import Path

MVP = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]

# Facts of the MVP instruments as Bybit lists them (linear, 2026-08-09 recording). Used only when the
# real response is not available (a fresh clone).
_MVP_FACTS = {
    "BTCUSDT": {"base": "BTC", "tick": "0.10", "lot": "0.001", "scale": "2", "funding": 480, "cap": "0.005", "launch": "1584230400000",
                    "max_qty": "1500.000", "max_mkt": "150.000", "lev": "100.00", "sid": 5, "max_px": "1999999.80"},
    "ETHUSDT": {"base": "ETH", "tick": "0.01", "lot": "0.01", "scale": "2", "funding": 480, "cap": "0.005", "launch": "1615766400000",
                    "max_qty": "10000.00", "max_mkt": "2000.00", "lev": "100.00", "sid": 6, "max_px": "199999.98"},
    "LTCUSDT": {"base": "LTC", "tick": "0.01", "lot": "0.1", "scale": "2", "funding": 480, "cap": "0.01", "launch": "1514764800000",
                    "max_qty": "8800.0", "max_mkt": "3000.0", "lev": "50.00", "sid": 24, "max_px": "199999.98"},
    "POLUSDT": {"base": "POL", "tick": "0.00001", "lot": "1", "scale": "5", "funding": 240, "cap": "0.0033",
                    "launch": "1725525013000", "max_qty": "2500000", "max_mkt": "500000", "lev": "75.00", "sid": 597,
                    "max_px": "199.99998"},
}

REPO = Path(__file__).resolve().parents[2]


def default_shared_real() -> Path | None:
    """``../shared/data/real`` next to the repository (or ``$TICKCAST_SHARED_REAL``), if present."""
    env = os.environ.get("TICKCAST_SHARED_REAL")
    p = Path(env) if env else REPO.parent / "shared" / "data" / "real"
    return p if p.is_dir() else None


def _decimals(step: str) -> int:
    return len(step.split(".", 1)[1]) if "." in step else 0


def fmt_fixed(n: int, dec: int) -> str:
    """Integer ``n`` in units of 10**-dec as a fixed-point string with exactly ``dec`` decimals."""
    if dec == 0:
        return str(n)
    sign = "-" if n < 0 else ""
    s = str(-n if n < 0 else n).rjust(dec + 1, "0")
    return f"{sign}{s[:-dec]}.{s[-dec:]}"


def fmt_trim(n: int, dec: int) -> str:
    """Like :func:`fmt_fixed` without trailing zeros (Bybit's kline and spot style: ``65119.9``, ``0``)."""
    s = fmt_fixed(n, dec)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def rescale(n: int, dec_from: int, dec_to: int) -> int:
    """Integer ``n`` (units of 10**-dec_from) in units of 10**-dec_to, rounded half away from zero."""
    if dec_to >= dec_from:
        return n * 10 ** (dec_to - dec_from)
    q = 10 ** (dec_from - dec_to)
    sign = -1 if n < 0 else 1
    return sign * ((abs(n) + q // 2) // q)


def fmt_decimal(x: Decimal | float, dec: int) -> str:
    """A number rounded half-up to ``dec`` fixed decimals."""
    return str(Decimal(str(x)).quantize(Decimal(1).scaleb(-dec), rounding=ROUND_HALF_UP))


def trim_decimal(x: Decimal | float, dec: int) -> str:
    s = fmt_decimal(x, dec)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


@dataclass(frozen=True)
class Instrument:
    symbol: str
    category: str
    tick_size: str
    qty_step: str
    price_scale: int
    funding_interval_min: int = 480
    funding_cap: str = "0.005"
    base: str = ""
    quote: str = "USDT"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def price_dec(self) -> int:
        return _decimals(self.tick_size)

    @cached_property
    def qty_dec(self) -> int:
        return _decimals(self.qty_step)

    @cached_property
    def tick_units(self) -> int:
        return int(Decimal(self.tick_size).scaleb(self.price_dec))

    @cached_property
    def lot_units(self) -> int:
        return int(Decimal(self.qty_step).scaleb(self.qty_dec))

    @cached_property
    def _px_cache(self) -> dict[int, str]:
        return {}

    @cached_property
    def _qty_cache(self) -> dict[int, str]:
        return {}

    def px(self, ticks: int) -> str:
        """``ticks`` of ``tickSize`` as Bybit's price string (fixed decimals of the tick)."""
        c = self._px_cache
        s = c.get(ticks)
        if s is None:
            if len(c) > 200_000:
                c.clear()
            s = c[ticks] = fmt_fixed(ticks * self.tick_units, self.price_dec)
        return s

    def qty(self, lots: int) -> str:
        """``lots`` of ``qtyStep`` as Bybit's size string."""
        c = self._qty_cache
        s = c.get(lots)
        if s is None:
            if len(c) > 200_000:
                c.clear()
            s = c[lots] = fmt_fixed(lots * self.lot_units, self.qty_dec)
        return s

    def px_trim(self, ticks: int) -> str:
        return fmt_trim(ticks * self.tick_units, self.price_dec)

    def qty_trim(self, lots: int) -> str:
        return fmt_trim(lots * self.lot_units, self.qty_dec)

    def turnover_trim(self, units: int) -> str:
        """Turnover given in units of tick*lot (exact: sum of price*size of the trades)."""
        return fmt_trim(units * self.tick_units * self.lot_units, self.price_dec + self.qty_dec)

    def to_ticks(self, price: str | Decimal) -> int:
        q = Decimal(price) / Decimal(self.tick_size)
        if q != q.to_integral_value():
            raise ValueError(f"{price} is not on the {self.symbol} tick grid {self.tick_size}")
        return int(q)

    def to_lots(self, size: str | Decimal) -> int:
        q = Decimal(size) / Decimal(self.qty_step)
        if q != q.to_integral_value():
            raise ValueError(f"{size} is not on the {self.symbol} lot grid {self.qty_step}")
        return int(q)


def _generated_linear_entry(symbol: str) -> dict:
    f = _MVP_FACTS[symbol]
    lot = f["lot"]
    return {
        "symbol": symbol, "contractType": "LinearPerpetual", "status": "Trading", "baseCoin": f["base"],
        "quoteCoin": "USDT", "launchTime": f["launch"], "deliveryTime": "0", "deliveryFeeRate": "",
        "priceScale": f["scale"],
        "leverageFilter": {"minLeverage": "1", "maxLeverage": f["lev"], "leverageStep": "0.01"},
        "priceFilter": {"minPrice": f["tick"], "maxPrice": f["max_px"], "tickSize": f["tick"]},
        "lotSizeFilter": {"maxOrderQty": f["max_qty"], "minOrderQty": lot, "qtyStep": lot,
                          "postOnlyMaxOrderQty": f["max_qty"], "maxMktOrderQty": f["max_mkt"],
                          "minNotionalValue": "5"},
        "unifiedMarginTrade": True, "fundingInterval": f["funding"], "settleCoin": "USDT", "copyTrading": "both",
        "upperFundingRate": f["cap"], "lowerFundingRate": "-" + f["cap"], "isPreListing": False,
        "preListingInfo": None, "riskParameters": {"priceLimitRatioX": "0.05", "priceLimitRatioY": "0.1"},
        "displayName": "", "symbolType": "", "forbidUplWithdrawal": False, "symbolId": f["sid"],
    }


class InstrumentBook:
    """The instruments-info lists per category, and :class:`Instrument` objects for the symbols."""

    def __init__(self, lists: dict[str, list[dict]], source: str):
        self.lists = lists
        self.source = source
        self._by: dict[tuple[str, str], Instrument] = {}
        for cat, items in lists.items():
            for raw in items:
                inst = self._parse(cat, raw)
                if inst is not None:
                    self._by[(cat, inst.symbol)] = inst

    @staticmethod
    def _parse(category: str, raw: dict) -> Instrument | None:
        try:
            sym = raw["symbol"]
            tick = raw["priceFilter"]["tickSize"]
            step = raw["lotSizeFilter"].get("qtyStep") or raw["lotSizeFilter"].get("basePrecision")
            scale = int(raw.get("priceScale", _decimals(tick)))
        except (KeyError, TypeError, ValueError):
            return None
        if not step:
            return None
        return Instrument(symbol=sym, category=category, tick_size=tick, qty_step=step, price_scale=scale,
                          funding_interval_min=int(raw.get("fundingInterval") or 480),
                          funding_cap=str(raw.get("upperFundingRate") or "0.005"),
                          base=raw.get("baseCoin", ""), quote=raw.get("quoteCoin", "USDT"), raw=raw)

    @classmethod
    def load(cls, shared_real: Path | str | None = None) -> InstrumentBook:
        """The real recorded responses when present, else the generated MVP list."""
        root = Path(shared_real) if shared_real else default_shared_real()
        lists: dict[str, list[dict]] = {}
        if root is not None:
            for cat in ("linear", "spot"):
                p = root / "cryptofeed_bybit_v5_20260809" / f"rest_instruments_info_{cat}.json"
                if p.is_file():
                    lists[cat] = json.loads(p.read_text())["result"]["list"]
        if "linear" in lists:
            return cls(lists, source=f"real responses under {root}")
        return cls.generated()

    @classmethod
    def generated(cls) -> InstrumentBook:
        return cls({"linear": [_generated_linear_entry(s) for s in sorted(_MVP_FACTS)]},
                   source="generated for the MVP symbols")

    def get(self, symbol: str, category: str = "linear") -> Instrument | None:
        return self._by.get((category, symbol))

    def require(self, symbol: str, category: str = "linear") -> Instrument:
        inst = self.get(symbol, category)
        if inst is None:
            hint = " (Bybit replaced MATICUSDT with POLUSDT)" if symbol == "MATICUSDT" else ""
            raise KeyError(f"{symbol} is not a listed {category} instrument{hint}")
        return inst

    def symbols(self, category: str = "linear") -> list[str]:
        return [raw["symbol"] for raw in self.lists.get(category, [])]
