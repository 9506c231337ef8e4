"""Realistic crypto headlines on a schedule: the content of the local feed server.

A pure function of (seed, story index): story j is published at ``epoch_s + j * period_s`` plus a
deterministic jitter, on one of the feeds; every sixth story is syndicated (same headline, another
URL) on the next feed 45 s later, so cross-source dedupe has real work to do. Stories name one
asset (BTC, ETH, LTC, POL: bullish, bearish or neutral), the market as a whole, another coin, or
are bait for the asset tagger ("Bitcoin Cash", "Ethereum Classic", "together", "Ethernet").
Prices follow a deterministic wobble around recent levels. ``inject`` adds a given story (tests).
"""
from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass

DEFAULT_FEEDS = ("cryptonews", "coindesk", "cointelegraph")
SYNDICATE_EVERY = 6
SYNDICATE_DELAY_S = 45.0

_ASSETS = {  # asset -> (names, ticker, price level)
    "BTC": (("Bitcoin",), "BTC", 97_000.0),
    "ETH": (("Ethereum", "Ether"), "ETH", 3_400.0),
    "LTC": (("Litecoin",), "LTC", 95.0),
    "POL": (("Polygon",), "POL", 0.42),
}
_OTHERS = (("Solana", "SOL", 180.0), ("XRP", "XRP", 2.3), ("Cardano", "ADA", 0.7), ("Dogecoin", "DOGE", 0.2))

_BULL = (
    ("{name} surges {pct}% to ${price} as ETF inflows climb",
     "Spot {ticker} funds drew ${amount}M of net inflows as {name} extended its advance."),
    ("{name} rallies past ${price} after {catalyst}",
     "Traders cheered as {name} broke through resistance; open interest rose to a record."),
    ("{ticker} bulls eye ${price} as ${amount}M of shorts are liquidated",
     "Short positions were squeezed across major exchanges in the past 24 hours."),
    ("{name} rebounds {pct}% to ${price} as whales accumulate",
     "On-chain data shows large wallets adding {ticker} for a third straight week."),
    ("{company} adds ${amount}M of {name} to its treasury, shares jump {pct}%",
     "The firm cited long-term adoption of {ticker} as the reason for the purchase."),
)
_BEAR = (
    ("{name} plunges {pct}% to ${price} as {trouble}",
     "{ticker} fell to its lowest level in weeks as sellers took control."),
    ("{name} slides below ${price} amid {macro} fears",
     "Risk assets sold off and {ticker} followed, with funding rates turning negative."),
    ("{venue} hacked: ${amount}M in {ticker} drained from hot wallet",
     "The exchange halted withdrawals after attackers exploited a signing flaw."),
    ("Regulators sue {venue} over ${amount}M {ticker} staking program",
     "The lawsuit alleges the program was an unregistered securities offering."),
    ("{ticker} tumbles {pct}% as whales move ${amount}M to exchanges",
     "Analysts warned that the transfers could signal a coming sell-off."),
)
_NEUTRAL = (
    ("{name} developers schedule network upgrade for {month} {day}",
     "Core developers outlined the testing schedule for the {ticker} upgrade."),
    ("{name} trades near ${price} ahead of {event}",
     "Volumes were thin as traders waited for {event}."),
    ("What's next for {ticker} at ${price}? Analysts weigh {pct} on-chain signals",
     "Exchange balances and active addresses give a mixed picture for {name}."),
)
_MARKET = (
    ("Crypto market cap tops ${cap}T as {ticker_any} leads a {pct}% risk-on move",
     "Digital assets rose broadly as equities rallied and the dollar weakened."),
    ("Fed holds rates at {rate}%; crypto traders brace for ${amount}M of options expiring",
     "Markets priced in a hold; attention turns to the next inflation print."),
    ("Stablecoin supply hits a record ${amount}B",
     "Growth in dollar-pegged tokens is often read as dry powder for crypto markets."),
    ("Crypto funds see ${amount}M of weekly outflows",
     "Investment products recorded outflows for a second week, led by large funds."),
    ("{venue} suffers {pct}-minute outage during volatile session",
     "Users reported failed orders before service was restored."),
)
_BAIT = (
    ("Bitcoin Cash hard fork proposal splits miners ahead of {month} {day} vote",
     "Developers of the Bitcoin Cash network debated a block-size change."),
    ("Ethereum Classic hashrate climbs {pct}% after miner migration",
     "Miners moved hardware to Ethereum Classic after a difficulty adjustment."),
    ("Together with {pct} banks, {company} pilots tokenized deposits",
     "The pilot settles interbank transfers on a permissioned ledger."),
    ("{company} ships Ethernet-connected signing devices to {pct} custodians",
     "The devices connect over Ethernet to air-gapped networks."),
    ("Wrapped Bitcoin custodian change puts ${amount}M of DeFi loans under review",
     "Lending protocols reviewed their exposure to the token's new custody setup."),
)
_FILL = {
    "catalyst": ("ETF approval", "a strong jobs report", "a major exchange listing", "the network upgrade"),
    "trouble": ("liquidations cascade", "a major exchange halts withdrawals", "miners sell reserves",
                "a stablecoin briefly depegs"),
    "macro": ("inflation", "recession", "rate-hike", "bank-stress"),
    "venue": ("CoinFlux", "BitHarbor", "KryptoDex", "NovaTrade"),
    "company": ("Meridian Corp", "Atlas Payments", "Nordlicht Capital", "Helix Mining"),
    "event": ("the Fed decision", "the CPI report", "options expiry", "the ETF deadline"),
    "month": ("March", "June", "September", "December"),
    "rate": ("4.25-4.50", "4.00-4.25", "3.75-4.00", "4.50-4.75"),
}


@dataclass(frozen=True)
class Story:
    j: int  # global index (injected stories: negative)
    feed: str
    published_s: float
    title: str
    summary: str
    url: str
    guid: str
    category: str  # the asset, "market", "other" or "bait"


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:80]


class HeadlineCatalog:
    def __init__(self, feeds: tuple[str, ...] = DEFAULT_FEEDS, *, seed: int = 7, epoch_s: float | None = None,
                 period_s: float = 60.0, backlog: int = 20):
        if not feeds:
            raise ValueError("at least one feed")
        self.feeds = tuple(feeds)
        self.seed = seed
        self.period_s = float(period_s)
        # default: a backlog of stories already out when the server starts
        self.epoch_s = float(epoch_s) if epoch_s is not None else math.floor(time.time() - backlog * period_s)
        self._injected: list[Story] = []

    def _u(self, j: int, salt: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{self.seed}:{j}:{salt}".encode(), digest_size=8).digest(), "big")

    def _pick(self, j: int, salt: str, options):
        return options[self._u(j, salt) % len(options)]

    def published_s(self, j: int) -> float:
        return self.epoch_s + j * self.period_s + (self._u(j, "jitter") % 1000) / 1000.0 * self.period_s * 0.5

    def _price(self, j: int, level: float) -> str:
        wobble = 0.06 * math.sin(j / 9.0) + 0.02 * ((self._u(j, "price") % 1000) / 500.0 - 1.0)
        p = level * math.exp(wobble)
        if p >= 1000:
            return f"{round(p, -2):,.0f}"
        if p >= 10:
            return f"{p:,.0f}"
        return f"{p:.3f}"

    def _fill(self, j: int, template: str, name: str, ticker: str, level: float) -> str:
        values = {k: self._pick(j, k, v) for k, v in _FILL.items()}
        values.update(name=name, ticker=ticker, price=self._price(j, level), pct=str(3 + self._u(j, "pct") % 15),
                      amount=str(20 + self._u(j, "amount") % 480), day=str(1 + self._u(j, "day") % 28), cap=f"{2.5 + (self._u(j, 'cap') % 150) / 100:.2f}",
                      ticker_any=self._pick(j, "any", ("BTC", "ETH", "SOL", "XRP", "DOGE")))
        return template.format(**values)

    def story(self, j: int, feed: str | None = None) -> Story:
        """Story j as published on its own feed (``feed``: a syndicated copy's feed)."""
        kind = self._u(j, "kind") % 100
        if kind < 65:
            asset = self._pick(j, "asset", tuple(_ASSETS))
            names, ticker, level = _ASSETS[asset]
            name = self._pick(j, "name", names)
            mood = self._u(j, "mood") % 10
            table = _BULL if mood < 4 else _BEAR if mood < 8 else _NEUTRAL
            title_t, summary_t = self._pick(j, "tpl", table)
            category = asset
        elif kind < 85:
            (title_t, summary_t), name, ticker, level, category = self._pick(j, "tpl", _MARKET), "", "", 1.0, "market"
        elif kind < 95:
            name, ticker, level = self._pick(j, "other", _OTHERS)
            title_t, summary_t = self._pick(j, "tpl", _BULL + _BEAR + _NEUTRAL)
            category = "other"
        else:
            (title_t, summary_t), name, ticker, level, category = self._pick(j, "tpl", _BAIT), "", "", 1.0, "bait"
        title = self._fill(j, title_t, name, ticker, level)
        summary = self._fill(j, summary_t, name, ticker, level)
        home = self.feeds[self._u(j, "feed") % len(self.feeds)]
        on = feed or home
        published = self.published_s(j) + (SYNDICATE_DELAY_S if on != home else 0.0)
        day = time.strftime("%Y/%m/%d", time.gmtime(published))
        url = f"https://{on}.news.invalid/{day}/{_slug(title)}-{j}"
        return Story(j, on, published, title, summary, url, f"{on}-{j}", category)

    def _copies(self, j: int) -> list[Story]:
        home = self.story(j)
        out = [home]
        if j % SYNDICATE_EVERY == 0 and len(self.feeds) > 1:
            nxt = self.feeds[(self.feeds.index(home.feed) + 1) % len(self.feeds)]
            out.append(self.story(j, nxt))
        return out

    def inject(self, feed: str, title: str, summary: str = "", *, published_s: float | None,
               url: str | None = None) -> Story:
        """Add a given story (``published_s`` None: an undated one, shown from now on)."""
        j = -(len(self._injected) + 1)
        url = url or f"https://{feed}.news.invalid/injected/{_slug(title)}{j}"
        story = Story(j, feed, published_s if published_s is not None else float("nan"), title, summary, url,
                      f"{feed}-inj{-j}", "injected")
        self._injected.append(story)
        return story

    def items(self, feed: str, now_s: float, n: int = 20) -> list[Story]:
        """The newest ``n`` stories of ``feed`` published by ``now_s``, newest first."""
        found: list[Story] = [s for s in self._injected if s.feed == feed
                              and (math.isnan(s.published_s) or s.published_s <= now_s)]
        j = math.floor((now_s - self.epoch_s) / self.period_s)
        scanned = 0
        while j >= 0 and scanned < 50 * n and sum(1 for s in found if s.j >= 0) < n:
            for s in self._copies(j):
                if s.feed == feed and s.published_s <= now_s:
                    found.append(s)
            j -= 1
            scanned += 1
        found.sort(key=lambda s: (-(now_s if math.isnan(s.published_s) else s.published_s), s.j))
        return found[:n]
