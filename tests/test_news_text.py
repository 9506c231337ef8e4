"""News text handling: asset tags (whole words, false positives), sentiment sign, identity and URLs."""
from __future__ import annotations

import pytest

from connectors.news.assets import symbol_asset, tag_assets
from connectors.news.normalise import (
    Rejected,
    canonical_url,
    clean_text,
    make_item_id,
    normalise_entry,
    normalise_title,
)
from connectors.news.sentiment import SentimentScorer, VaderScorer


@pytest.mark.parametrize("text,assets", [
    ("Bitcoin surges to a record", ["BTC"]),
    ("BTC/USDT breaks out; $BTC dominance rises", ["BTC"]),
    ("Bitcoin's hashrate and bitcoins held by ETFs", ["BTC"]),
    ("BTCUSDT perpetual funding turns negative", ["BTC"]),
    ("Ether falls as Ethereum gas fees spike", ["ETH"]),
    ("ETH-based tokens rally", ["ETH"]),
    ("Litecoin-based payments grow; LTC up 3%", ["LTC"]),
    ("Polygon upgrade: MATIC becomes POL", ["POL"]),
    ("$MATIC holders migrate", ["POL"]),
    ("Bitcoin and Ether lead; Litecoin and Polygon lag", ["BTC", "ETH", "LTC", "POL"]),
    # false positives: substrings and other assets that share a name
    ("Together with banks, a payments firm pilots tokenized deposits", []),
    ("Ethernet-connected signing devices ship to custodians", []),
    ("Etherscan outage; Ethereal art sells", []),
    ("Bitcoin Cash hard fork splits miners", []),
    ("bitcoin SV and Bitcoin Gold delisted", []),
    ("Wrapped Bitcoin custodian changes", []),
    ("Ethereum Classic hashrate climbs", []),
    ("Litecoin Cash is not Litecoin", ["LTC"]),
    ("Pol Pot documentary; the pol tax", []),  # tickers match in upper case only
    ("automatic politics", []),
    ("Wrapped Bitcoin shrinks while Bitcoin grows", ["BTC"]),
])
def test_asset_tags(text, assets):
    assert tag_assets(text) == assets


def test_tags_from_title_and_summary():
    assert tag_assets("Markets wobble", "Ether and Bitcoin slipped") == ["BTC", "ETH"]
    assert tag_assets("Markets wobble", None) == []


@pytest.mark.parametrize("symbol,asset", [("BTCUSDT", "BTC"), ("ETHUSDT", "ETH"), ("LTCUSDT", "LTC"),
                                          ("POLUSDT", "POL"), ("MATICUSDT", "POL"), ("BTCPERP", "BTC"),
                                          ("XRPUSDT", None), ("USDT", None)])
def test_symbol_asset(symbol, asset):
    assert symbol_asset(symbol) == asset


@pytest.fixture(scope="module")
def vader():
    return VaderScorer()


@pytest.mark.parametrize("title,sign", [
    ("Bitcoin surges past $110,000 as ETF inflows soar", 1),
    ("Ethereum rallies after the upgrade is approved; traders bullish", 1),
    ("Litecoin rebounds as whales accumulate", 1),
    ("Exchange hacked: $150M in ETH drained from hot wallet", -1),
    ("Bitcoin plunges 12% as liquidations cascade", -1),
    ("Regulators sue exchange over fraud; Polygon tumbles", -1),
    ("Ether slides below $3,000 amid recession fears", -1),
    ("Litecoin developers publish the testnet schedule", 0),
])
def test_sentiment_sign(vader, title, sign):
    s = vader.score(title)
    assert -1.0 <= s <= 1.0
    if sign == 0:
        assert abs(s) < 0.2, s
    else:
        assert s * sign > 0.2, s


def test_sentiment_summary_moves_score_by_a_third(vader):
    t, summ = "Bitcoin surges to a record", "Analysts warn of fraud and a crash."
    st, ss = vader.score(t), vader._compound(summ)
    assert vader.score(t, summ) == pytest.approx((2 * st + ss) / 3)
    assert vader.score(t, summ) < st
    assert vader.score(t, summ) == vader.score(t, summ)  # deterministic


def test_scorer_is_replaceable():
    class Always(SentimentScorer):
        name = "always-bearish"

        def score(self, title, summary=None):
            return -0.5

    e = normalise_entry({"title": "Bitcoin surges", "link": "https://x.test/a", "published_parsed":
                         (2025, 6, 10, 10, 0, 0, 1, 161, 0)}, source="s", venue="news.s", feed_url="u",
                        recv_ts_us=1_749_600_000_000_000, scorer=Always(), source_weight=1.0, allow_undated=False)
    assert isinstance(Always(), SentimentScorer) and isinstance(VaderScorer(), SentimentScorer)
    assert e.sentiment == -0.5 and e.assets == ("BTC",)


def test_canonical_url_and_identity():
    a = canonical_url("http://WWW.Example.com/news/story/?utm_source=rss&b=2&a=1#top")
    b = canonical_url("https://example.com/news/story?a=1&b=2&fbclid=xyz")
    assert a == b == "https://example.com/news/story?a=1&b=2"
    assert canonical_url("ftp://example.com/x") is None and canonical_url("not a url") is None
    assert canonical_url("https://example.com:8443/x") == "https://example.com:8443/x"
    assert normalise_title("Bitcoin Price Surges Past $110,000 – Traders Eye New Record!") == \
        normalise_title("bitcoin price surges past $110 000: traders eye new record")
    assert make_item_id(a, "t") == make_item_id(b, "t") != make_item_id(a, "u")
    assert len(make_item_id(a, "t")) == 24


def test_clean_text():
    assert clean_text("<p>Hello&nbsp;&amp; <b>world</b></p>\n\n") == "Hello & world"
    assert clean_text(None) == "" and clean_text("  a \t b ") == "a b"


def _norm(entry, **kw):
    args = {"source": "s", "venue": "news.s", "feed_url": "u", "recv_ts_us": 1_749_600_000_000_000,
            "scorer": VaderScorer(), "source_weight": 0.5, "allow_undated": False}
    args.update(kw)
    return normalise_entry(entry, **args)


def test_normalise_bad_entries():
    ts = (2025, 6, 10, 10, 0, 0, 1, 161, 0)
    assert _norm({"link": "https://x.test/a", "published_parsed": ts}).error_kind == "missing_field"
    assert _norm({"title": "t", "published_parsed": ts}).error_kind == "missing_field"
    assert _norm({"title": "t", "link": "javascript:alert(1)", "published_parsed": ts}).error_kind == "bad_url"
    undated = {"title": "Bitcoin up", "link": "https://x.test/b"}
    r = _norm(undated)
    assert isinstance(r, Rejected) and r.error_kind == "missing_date" and b"Bitcoin up" in r.payload
    ok = _norm(undated, allow_undated=True)
    assert ok.published_ts is None and ok.exchange_ts == 1_749_600_000_000  # the receive time
    assert _norm({**undated, "published": "yesterday-ish"}).error_kind == "bad_date"
    assert _norm({**undated, "published_parsed": (2001, 1, 1, 0, 0, 0, 0, 1, 0)}).error_kind == "bad_date"
    assert _norm({**undated, "published_parsed": (2031, 1, 1, 0, 0, 0, 0, 1, 0)}).error_kind == "bad_date"
    assert _norm({"title": "x" * 1500, "link": "https://x.test/c", "published_parsed": ts}).error_kind == "huge_item"
    huge = _norm({"title": "t", "link": "https://x.test/d", "published_parsed": ts, "summary": "word " * 20_000})
    assert huge.error_kind == "huge_item" and len(huge.payload) <= 16_384


def test_normalise_clamps_future_dates_and_trims_summary():
    recv_us = 1_749_600_000_000_000
    e = _norm({"title": "Ether up", "link": "https://x.test/e", "summary": "<p>" + "word " * 400 + "</p>",
               "published_parsed": (2025, 6, 11, 4, 0, 0, 2, 162, 0)}, recv_ts_us=recv_us)
    assert e.published_ts == recv_us // 1000 + 4 * 3600 * 1000  # the feed's clock runs 4 h ahead
    assert e.exchange_ts == recv_us // 1000  # never dated after its receive time
    assert len(e.summary) <= 1001 and e.summary.endswith("…") and "<p>" not in e.summary
    assert e.source_weight == 0.5 and e.assets == ("ETH",)
