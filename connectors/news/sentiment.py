"""Headline sentiment behind a small interface, so a stronger model can replace the lexicon.

``SentimentScorer`` is the whole contract: a ``name`` (recorded in logs, so a change of model is
visible) and ``score(title, summary) -> float`` in [-1, 1], deterministic for the same text. The
default ``VaderScorer`` is VADER (vaderSentiment from PyPI, whose lexicon ships inside the wheel: no
download at run time) with a small market lexicon on top: VADER is tuned on social-media text and
scores "Bitcoin surges to a record" or "Ether plunges" as neutral, because "surge" and "plunge" are
not in its lexicon. The additions are listed below, so the scorer stays auditable.

The headline carries most of the signal; the summary, when there is one, moves the score by a third.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable


@runtime_checkable
class SentimentScorer(Protocol):
    name: str

    def score(self, title: str, summary: str | None = None) -> float:
        """Sentiment in [-1, 1]: negative bearish, positive bullish, 0 neutral."""
        ...


# word -> valence on VADER's scale (-4 .. 4). Market verbs and nouns VADER lacks or misreads.
MARKET_LEXICON: dict[str, float] = {
    # up
    "surge": 1.8, "surges": 1.8, "surged": 1.8, "surging": 1.8,
    "soar": 2.0, "soars": 2.0, "soared": 2.0, "soaring": 2.0,
    "rally": 1.6, "rallies": 1.6, "rallied": 1.6, "rallying": 1.6,
    "jump": 1.2, "jumps": 1.2, "jumped": 1.2,
    "climb": 1.0, "climbs": 1.0, "climbed": 1.0,
    "rebound": 1.2, "rebounds": 1.2, "rebounded": 1.2,
    "recover": 1.1, "recovers": 1.1, "recovered": 1.1,
    "bullish": 1.9, "bulls": 1.2, "breakout": 1.3, "inflows": 1.0, "adoption": 0.8, "upgrade": 0.6,
    "outperforms": 1.3, "all-time": 0.8, "ath": 1.2, "greenlight": 1.5, "greenlights": 1.5,
    # down
    "plunge": -2.0, "plunges": -2.0, "plunged": -2.0, "plunging": -2.0,
    "tumble": -1.8, "tumbles": -1.8, "tumbled": -1.8,
    "slump": -1.8, "slumps": -1.8, "slumped": -1.8,
    "slide": -1.2, "slides": -1.2, "slid": -1.2,
    "drops": -1.1, "dropped": -1.1, "fall": -1.0, "falls": -1.0, "fell": -1.0,
    "sink": -1.4, "sinks": -1.4, "sank": -1.4,
    "crashes": -1.9, "crashed": -1.9, "hack": -2.2, "hacks": -2.2, "exploit": -1.8, "exploits": -1.8,
    "drained": -1.8, "sues": -1.5, "sued": -1.5, "liquidations": -1.3, "liquidated": -1.4,
    "outflows": -1.0, "bearish": -1.9, "bears": -1.2, "selloff": -1.8, "sell-off": -1.8, "delays": -1.1,
    "outage": -1.6, "halt": -1.2, "halts": -1.2, "halted": -1.2, "bankruptcy": -2.4,
    "insolvency": -2.3, "insolvent": -2.3, "dip": -0.8, "dips": -0.8, "crackdown": -1.7,
    "underperforms": -1.3, "delisting": -1.6, "delists": -1.6, "depeg": -2.0, "depegs": -2.0,
}


class VaderScorer:
    """VADER compound score with the market lexicon; ``score`` is pure and deterministic."""

    def __init__(self, extra_lexicon: dict[str, float] | None = None):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()
        self._vader.lexicon.update(MARKET_LEXICON)
        if extra_lexicon:
            self._vader.lexicon.update({k.lower(): float(v) for k, v in extra_lexicon.items()})
        self.name = "vader-3.3+market-1" + ("+custom" if extra_lexicon else "")

    def _compound(self, text: str) -> float:
        return float(self._vader.polarity_scores(text)["compound"])

    def score(self, title: str, summary: str | None = None) -> float:
        s = self._compound(title or "")
        if summary:
            s = (2.0 * s + self._compound(summary)) / 3.0
        if not math.isfinite(s):
            return 0.0
        return max(-1.0, min(1.0, s))
