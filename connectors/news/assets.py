"""Which assets a headline mentions, and which asset a market symbol trades.

Matching is on whole words only: a name or ticker counts when it is not glued to a letter or digit
on either side, so "ether" inside "together" or "Ethernet" does not match, while "Bitcoin's",
"Ethereum-based", "$BTC" and "BTC/USDT" do. Names match in any case; tickers are matched in upper
case only (so the Spanish/Catalan word "pol", or a name like "Pol", does not tag POL). Different
assets that share a name are excluded explicitly: "Bitcoin Cash", "Bitcoin SV", "Bitcoin Gold",
"Wrapped Bitcoin" are not BTC, "Ethereum Classic" is not ETH, "Litecoin Cash" is not LTC.
"""
from __future__ import annotations

import re

# Asset -> (case-insensitive name aliases, upper-case ticker aliases). MATIC was renamed POL.
ASSETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "BTC": (("bitcoin", "bitcoins"), ("BTC", "XBT")),
    "ETH": (("ethereum", "ether"), ("ETH",)),
    "LTC": (("litecoin", "litecoins"), ("LTC",)),
    "POL": (("polygon", "matic"), ("POL", "MATIC")),
}
# words after (or before) a name that make it a different asset
_NOT_AFTER = {
    "BTC": r"(?:cash|sv|gold|satoshi\s+vision)",
    "ETH": r"(?:classic|pow)",
    "LTC": r"(?:cash)",
    "POL": r"",
}
_NOT_BEFORE = {"BTC": r"wrapped\s+", "ETH": r"wrapped\s+", "LTC": "", "POL": ""}
# market-pair suffixes glued to a ticker that still mean the asset: BTCUSDT, ETHUSD, POL-PERP
_PAIR = r"(?:[-/]?(?:USDT|USDC|USD|PERP|EUR))?"
_EDGE_L = r"(?<![A-Za-z0-9])"
_EDGE_R = r"(?![A-Za-z0-9])"


def _pattern(asset: str) -> re.Pattern:
    names, tickers = ASSETS[asset]
    not_after = rf"(?!\s+(?i:{_NOT_AFTER[asset]}){_EDGE_R})" if _NOT_AFTER[asset] else ""
    # a fixed-width look-behind cannot take \s+, so the "wrapped" exclusion is checked in code
    name_alt = "|".join(sorted(names, key=len, reverse=True))
    ticker_alt = "|".join(sorted(tickers, key=len, reverse=True))
    return re.compile(
        rf"{_EDGE_L}(?:(?i:(?P<name>{name_alt}))|(?P<ticker>{ticker_alt}){_PAIR}){_EDGE_R}{not_after}")


_PATTERNS = {a: _pattern(a) for a in ASSETS}
_WRAPPED = {a: re.compile(rf"(?i:{p})$") for a, p in _NOT_BEFORE.items() if p}


def mentions(text: str, asset: str) -> bool:
    """Whether ``text`` names ``asset`` (one of ASSETS) as a whole word."""
    pat = _PATTERNS[asset]
    for m in pat.finditer(text):
        wrapped = _WRAPPED.get(asset)
        if wrapped is not None and wrapped.search(text[:m.start()]):
            continue
        return True
    return False


def tag_assets(*texts: str | None) -> list[str]:
    """Sorted asset codes mentioned in any of ``texts`` (title, summary)."""
    joined = "\n".join(t for t in texts if t)
    return sorted(a for a in ASSETS if mentions(joined, a))


_QUOTES = ("USDT", "USDC", "USD", "PERP", "EUR")
_SYMBOL_ALIASES = {"MATIC": "POL"}


def symbol_asset(symbol: str) -> str | None:
    """The asset a market symbol trades (BTCUSDT -> BTC, MATICUSDT -> POL), None when unknown."""
    base = symbol.upper()
    for q in _QUOTES:
        if base.endswith(q) and len(base) > len(q):
            base = base[: -len(q)]
            break
    base = _SYMBOL_ALIASES.get(base, base)
    return base if base in ASSETS else None
