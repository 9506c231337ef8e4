"""Bybit v5 message parsing: Bybit's documented examples, the real recording (when ../shared is
there), ticker merging against the replayed books, and every kind of bad input."""
from __future__ import annotations

import json
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from connectors.bybit.parse import BybitParser, ParseError, control_kind, decode
from tests.test_gateway_support import SyntheticMarket, dumps

DOCS = Path(__file__).parent / "fixtures" / "bybit_docs"
RECORDING = "cryptofeed_bybit_v5_20260809"


def doc_examples(name: str) -> list[dict]:
    """The JSON examples of a docs page; blocks the docs elided (``...``) or doubled are repaired."""
    out = []
    for block in json.loads((DOCS / name).read_text()):
        if "_unparsed_text" not in block:
            out.append(block)
            continue
        text = "\n".join(line for line in block["_unparsed_text"].splitlines()
                         if line.strip() not in ("...", "...,") and not line.lstrip().startswith("//"))
        text = re.sub(r",(\s*[\]}])", r"\1", text)
        # several examples in one block, each preceded by a title line
        for chunk in re.split(r"\n(?=[A-Za-z][A-Za-z ]*\n\{)", "\n" + text):
            chunk = chunk.strip()
            if not chunk:
                continue
            if not chunk.startswith("{"):
                chunk = chunk.split("\n", 1)[1]
            out.append(json.loads(chunk))
    return out


def events_of(parser: BybitParser, msg: dict | str, recv_ts: int = 1) -> list[tuple[str, dict]]:
    if isinstance(msg, str):
        msg = decode(msg)
    return parser.events(msg, recv_ts)


# --- Bybit's documentation ------------------------------------------------------------------------


def test_docs_orderbook_snapshot_and_delta():
    snap, delta = doc_examples("websocket_public_orderbook.examples.json")
    p = BybitParser()
    [(name, rec)] = events_of(p, snap, recv_ts=123)
    assert name == "OrderBookSnapshot"
    assert rec["symbol"] == "BTCUSDT" and rec["depth"] == 50 and rec["venue"] == "bybit.linear"
    assert rec["bid_px"] == ["16493.50", "16493.00"] and rec["bid_sz"] == ["0.006", "0.100"]
    assert rec["ask_px"] == ["16611.00", "16612.00"] and rec["ask_sz"] == ["0.029", "0.213"]
    assert (rec["update_id"], rec["cross_seq"], rec["exchange_ts"], rec["match_ts"], rec["recv_ts"]) == \
        (18521288, 7961638724, 1672304484978, 1672304484976, 123)
    [(name, rec)] = events_of(p, delta)
    assert name == "OrderBookDelta"
    assert rec["bid_px"] == [lvl[0] for lvl in delta["data"]["b"]]
    assert rec["ask_sz"] == [lvl[1] for lvl in delta["data"]["a"]]
    assert "0" in rec["bid_sz"] and rec["update_id"] == 177400507 and rec["cross_seq"] == 66544703342


def test_docs_trade_kline_ticker():
    p = BybitParser(symbols=None, kline_intervals=("1", "5"))
    [trade_msg] = doc_examples("websocket_public_trade.examples.json")
    [(name, t)] = events_of(p, trade_msg)
    assert name == "Trade" and t["trade_id"] == "20f43950-d8dd-5b31-9112-a178eb6023af"
    assert (t["price"], t["size"], t["side"], t["trade_ts"], t["block_trade"], t["rpi"], t["cross_seq"]) == \
        ("16578.50", "0.001", "Buy", 1672304486865, False, None, 1783284617)
    [kline_msg] = doc_examples("websocket_public_kline.examples.json")
    [(name, k)] = events_of(p, kline_msg)
    assert name == "Kline" and k["interval"] == "5" and k["confirm"] is False
    assert (k["open"], k["close"], k["high"], k["low"], k["volume"], k["turnover"]) == \
        ("16649.5", "16677", "16677", "16608", "2.081", "34666.4005")
    assert (k["start_ts"], k["end_ts"]) == (1672324800000, 1672325099999)
    linear = [m for m in doc_examples("websocket_public_ticker.examples.json")
              if m.get("topic") == "tickers.BTCUSDT" and m["data"].get("fundingRate")]
    [(name, tk), (fname, f)] = events_of(p, linear[0])
    assert name == "Ticker" and tk["is_snapshot"] and tk["funding_rate"] == "-0.005"
    assert tk["next_funding_time"] == 1760342400000 and tk["funding_interval_hour"] == 8
    assert (tk["bid1_price"], tk["ask1_price"], tk["mark_price"]) == ("66666.60", "66666.70", "66666.60")
    assert tk["cross_seq"] == 9532239429
    assert fname == "Funding" and f["kind"] == "ticker" and f["funding_rate"] == "-0.005"


def test_docs_futures_ticker_empty_funding_fields_are_null():
    futures = [m for m in doc_examples("websocket_public_ticker.examples.json")
               if m.get("topic") == "tickers.BTC-26DEC25"]
    [(name, tk)] = events_of(BybitParser(), futures[0])
    assert name == "Ticker" and tk["funding_rate"] is None and tk["next_funding_time"] is None


# --- the real recording -----------------------------------------------------------------------------


def _recording(shared_real: Path, name: str) -> list[str]:
    return (shared_real / RECORDING / name).read_text().splitlines()


def _expected_events(msg: dict) -> list[tuple[str, str]]:
    """(record name, key) the gateway must produce for one raw message, derived from the raw JSON."""
    topic = msg["topic"]
    if topic.startswith("orderbook."):
        kind = "OrderBookSnapshot" if msg["type"] == "snapshot" or msg["data"]["u"] == 1 else "OrderBookDelta"
        return [(kind, str(msg["data"]["u"]))]
    if topic.startswith("publicTrade."):
        return [("Trade", str(t["i"])) for t in msg["data"]]
    if topic.startswith("kline."):
        return [("Kline", str(c["start"])) for c in msg["data"]]
    return [("Ticker", str(msg["ts"]))]


def _key(name: str, rec: dict) -> str:
    return {"OrderBookSnapshot": lambda: str(rec["update_id"]), "OrderBookDelta": lambda: str(rec["update_id"]),
            "Trade": lambda: rec["trade_id"], "Kline": lambda: str(rec["start_ts"]),
            "Ticker": lambda: str(rec["exchange_ts"])}[name]()


def check_every_message(lines: list[str], venue: str) -> tuple[BybitParser, Counter, int]:
    """Each message gives exactly the events its raw JSON calls for, with the exchange's strings."""
    p = BybitParser(venue)
    counts = Counter()
    acks = 0
    for i, line in enumerate(lines):
        msg = decode(line)
        if control_kind(msg):
            acks += 1
            assert msg["success"] is True
            continue
        evs = p.events(msg, recv_ts=i)
        got = [(n, _key(n, r)) for n, r in evs if n != "Funding"]
        assert got == _expected_events(msg), line[:200]
        for n, r in evs:
            counts[(msg["topic"].split(".")[0], n)] += 1
            assert r["venue"] == venue and r["recv_ts"] == i and r["exchange_ts"] == msg["ts"]
            assert r["symbol"] == msg["topic"].split(".")[-1]
        # prices and sizes are the exchange's strings, verbatim
        if msg["topic"].startswith("orderbook."):
            r = evs[0][1]
            assert [list(x) for x in zip(r["bid_px"], r["bid_sz"])] == msg["data"]["b"]
            assert [list(x) for x in zip(r["ask_px"], r["ask_sz"])] == msg["data"]["a"]
            assert (r["update_id"], r["cross_seq"], r["match_ts"]) == (msg["data"]["u"], msg["data"]["seq"],
                                                                      msg.get("cts"))
        elif msg["topic"].startswith("publicTrade."):
            for (_, r), t in zip(evs, msg["data"]):
                assert (r["price"], r["size"], r["side"], r["trade_ts"], r["trade_id"]) == \
                    (t["p"], t["v"], t["S"], t["T"], str(t["i"]))
        elif msg["topic"].startswith("kline."):
            for (_, r), c in zip(evs, msg["data"]):
                assert (r["open"], r["high"], r["low"], r["close"], r["volume"], r["turnover"], r["confirm"]) == \
                    (c["open"], c["high"], c["low"], c["close"], c["volume"], c["turnover"], c["confirm"])
    return p, counts, acks


def test_every_message_of_a_local_exchange_recording_parses(tmp_path):
    """Fresh-clone coverage: what the local exchange's market model sends (all four channels)."""
    from connectors.exchange.recording import record_model

    path = tmp_path / "model.jsonl"
    record_model(path, ["BTCUSDT", "POLUSDT"], seed=3, start_ms=1_786_310_760_000, seconds=70,
                 prefixes=["orderbook.50", "publicTrade", "tickers", "kline.1"])
    lines = path.read_text().splitlines()
    p, counts, _ = check_every_message(lines, "sim.linear")
    assert {k[1] for k in counts} >= {"OrderBookSnapshot", "OrderBookDelta", "Trade", "Ticker", "Kline"}
    assert p.book_gaps == 0 and p.duplicate_trades == 0
    assert any(json.loads(ln).get("data", [{}])[0].get("confirm") for ln in lines if '"kline.' in ln)


@pytest.mark.shared_data
@pytest.mark.parametrize("file,venue", [("linear_ws_raw.jsonl", "bybit.linear"), ("spot_ws_raw.jsonl", "bybit.spot")])
def test_every_recorded_message_parses_into_the_right_events(shared_real, file, venue):
    lines = _recording(shared_real, file)
    p, counts, acks = check_every_message(lines, venue)
    if file.startswith("linear"):
        # the counts SOURCES.md states for the linear recording
        assert acks == 17
        assert counts[("orderbook", "OrderBookSnapshot")] == 4
        assert counts[("orderbook", "OrderBookDelta")] == 413 + 420 + 382 + 379
        assert counts[("tickers", "Ticker")] == 4 + 184 + 215 + 192 + 163
        assert counts[("publicTrade", "Trade")] == 56 + 23 + 165 + 83
        assert counts[("kline", "Kline")] == sum(len(json.loads(x)["data"]) for x in lines if '"kline.' in x)
        assert p.duplicate_trades == 0
    else:
        assert acks == 7 and counts[("tickers", "Ticker")] == 81  # spot tickers are all snapshots


def _top(book: dict[str, dict[Decimal, str]]) -> tuple[Decimal | None, Decimal | None]:
    return (max(book["b"]) if book["b"] else None, min(book["a"]) if book["a"] else None)


@pytest.mark.shared_data
def test_ticker_merging_reproduces_the_recorded_best_bid_ask(shared_real):
    """Replay every book from its snapshot and deltas; at each ticker message that carries bid1/ask1,
    the merged ticker's best bid/ask must equal the book's top (SOURCES.md: 124/124 BTC, 197/197 ETH,
    150/151 SOL, 145/148 DOGE, the misses being arrival-order races between the two streams)."""
    p = BybitParser()
    books: dict[str, dict] = {}
    match, total = Counter(), Counter()
    for line in _recording(shared_real, "linear_ws_raw.jsonl"):
        msg = decode(line)
        if control_kind(msg):
            continue
        evs = p.events(msg, 0)
        name, rec = evs[0]
        sym = rec["symbol"]
        if name == "OrderBookSnapshot":
            books[sym] = {"b": {}, "a": {}}
        if name in ("OrderBookSnapshot", "OrderBookDelta"):
            for side in ("bid", "ask"):
                levels = books[sym][side[0]]
                for px, sz in zip(rec[f"{side}_px"], rec[f"{side}_sz"]):
                    if Decimal(sz) == 0:
                        levels.pop(Decimal(px), None)
                    else:
                        levels[Decimal(px)] = sz
        elif name == "Ticker" and sym in books and {"bid1Price", "ask1Price"} & set(msg["data"]):
            total[sym] += 1
            bid, ask = _top(books[sym])
            match[sym] += (Decimal(rec["bid1_price"]), Decimal(rec["ask1_price"])) == (bid, ask)
    assert total == {"BTCUSDT": 124, "ETHUSDT": 197, "SOLUSDT": 151, "DOGEUSDT": 148}
    assert match["BTCUSDT"] == 124 and match["ETHUSDT"] == 197
    assert match["SOLUSDT"] >= 150 and match["DOGEUSDT"] >= 145


@pytest.mark.shared_data
def test_merged_ticker_state_matches_a_full_replay_of_the_raw_fields(shared_real):
    """Independently merge the raw JSON dicts; every mapped field of every Ticker must agree."""
    from connectors.bybit.parse import TICKER_FIELDS

    p = BybitParser()
    state: dict[str, dict] = {}
    n = 0
    for line in _recording(shared_real, "linear_ws_raw.jsonl"):
        msg = decode(line)
        if control_kind(msg) or not msg["topic"].startswith("tickers."):
            continue
        sym = msg["data"]["symbol"]
        state[sym] = dict(msg["data"]) if msg["type"] == "snapshot" else {**state[sym], **msg["data"]}
        rec = p.events(msg, 0)[0][1]
        for raw_key, (field, kind) in TICKER_FIELDS.items():
            raw = state[sym].get(raw_key)
            want = None if raw in (None, "") else (int(raw) if kind in ("int", "int32") else raw)
            assert rec[field] == want, (raw_key, line[:120])
        n += 1
    assert n == 758


# --- behaviour ----------------------------------------------------------------------------------------


def test_ticker_delta_merge_changed_fields_and_funding_events():
    m = SyntheticMarket("BTCUSDT")
    p = BybitParser()
    evs = events_of(p, m.ticker_snapshot())
    assert [n for n, _ in evs] == ["Ticker", "Funding"]
    snap = evs[0][1]
    assert snap["is_snapshot"] and "funding_rate" in snap["changed"] and "last_price" in snap["changed"]
    evs = events_of(p, m.ticker_delta())
    assert [n for n, _ in evs] == ["Ticker"]
    tk = evs[0][1]
    assert not tk["is_snapshot"] and tk["funding_rate"] == "0.0001" and tk["last_price"] == snap["last_price"]
    assert set(tk["changed"]) <= {"bid1_price", "bid1_size", "ask1_price", "ask1_size"}
    assert "bid1_size" in tk["changed"] or "ask1_size" in tk["changed"]
    evs = events_of(p, m.ticker_delta(funding_rate="-0.00025"))
    assert [n for n, _ in evs] == ["Ticker", "Funding"]
    assert evs[1][1]["funding_rate"] == "-0.00025" and evs[1][1]["next_funding_time"] == 1786320000000
    assert "funding_rate" in evs[0][1]["changed"]
    # a fresh snapshot with the same funding does not repeat the funding event
    assert [n for n, _ in events_of(p, m.ticker_snapshot())] == ["Ticker"]


def test_trades_are_deduplicated_on_trade_id():
    m = SyntheticMarket("ETHUSDT")
    p = BybitParser()
    first = events_of(p, m.trades(3))
    again = events_of(p, m.trades(2, repeat_id=first[1][1]["trade_id"]))
    assert len(first) == 3 and len(again) == 1 and p.duplicate_trades == 1


def test_u_equal_1_is_a_snapshot_whatever_the_type():
    msg = json.loads(SyntheticMarket("BTCUSDT").book_delta())
    msg["data"]["u"] = 1
    [(name, rec)] = events_of(BybitParser(), dumps(msg))
    assert name == "OrderBookSnapshot" and rec["update_id"] == 1


def test_a_repeated_u_is_counted_apart_from_a_gap():
    m = SyntheticMarket("BTCUSDT")
    p = BybitParser()
    base = json.loads(m.book_delta())
    base["type"] = "snapshot"
    base["data"]["u"] = 100
    events_of(p, dumps(base))
    for u in (101, 102, 102, 104, 103, 105):  # a resend, then a reordered pair
        msg = json.loads(m.book_delta())
        msg["data"]["u"] = u
        [(name, rec)] = events_of(p, dumps(msg))
        assert name == "OrderBookDelta" and rec["update_id"] == u  # all published as is
    assert (p.book_gaps, p.book_repeats) == (1, 2)  # 104 skips 103; 102 and 103 are not above the last


def test_control_replies():
    assert control_kind(decode('{"success":true,"ret_msg":"pong","conn_id":"x","req_id":"1","op":"ping"}')) == "pong"
    assert control_kind(decode('{"success":true,"ret_msg":"","conn_id":"x","req_id":"","op":"subscribe"}')) == \
        "subscribe"
    assert control_kind(decode('{"topic":"tickers.BTCUSDT"}')) is None


def _mutate(text: str, fn) -> str:
    msg = json.loads(text)
    fn(msg)
    return dumps(msg)


_M = SyntheticMarket("BTCUSDT", seed=3)
_DELTA = _M.book_delta()
_TRADE = _M.trades(1)
_KLINE = _M.kline()

BAD = {
    "malformed_json": '{"topic":"orderbook.50.BTCUSDT","type":"delta",',
    "not_an_object": '[1,2,3]',
    "unknown_topic": _mutate(_DELTA, lambda m: m.update(topic="liquidation.BTCUSDT")),
    "unknown_topic_depth": _mutate(_DELTA, lambda m: m.update(topic="orderbook.500.BTCUSDT")),
    "unknown_symbol": _mutate(_DELTA, lambda m: (m.update(topic="orderbook.50.XRPUSDT"), m["data"].update(s="XRPUSDT"))),
    "missing_field": _mutate(_DELTA, lambda m: m["data"].pop("u")),
    "missing_ts": _mutate(_DELTA, lambda m: m.pop("ts")),
    "negative_size": _mutate(_DELTA, lambda m: m["data"]["b"][0].__setitem__(1, "-1.5")),
    "nan_size": _mutate(_DELTA, lambda m: m["data"]["a"][0].__setitem__(1, "NaN")),
    "inf_price": _mutate(_DELTA, lambda m: m["data"]["a"][0].__setitem__(0, "Infinity")),
    "garbage_price": _mutate(_DELTA, lambda m: m["data"]["a"][0].__setitem__(0, "12x.5")),
    "number_not_string": _mutate(_DELTA, lambda m: m["data"]["b"][0].__setitem__(0, 65000.1)),
    "level_not_pair": _mutate(_DELTA, lambda m: m["data"]["b"].append(["1.0"])),
    "level_is_string": _mutate(_DELTA, lambda m: m["data"]["b"].append("12")),
    "u_is_string": _mutate(_DELTA, lambda m: m["data"].update(u="1001")),
    "ts_is_float": _mutate(_DELTA, lambda m: m.update(ts=1.5)),
    "symbol_mismatch": _mutate(_DELTA, lambda m: m["data"].update(s="ETHUSDT")),
    "trade_negative_size": _mutate(_TRADE, lambda m: m["data"][0].update(v="-0.1")),
    "trade_bad_side": _mutate(_TRADE, lambda m: m["data"][0].update(S="Hold")),
    "trade_missing_id": _mutate(_TRADE, lambda m: m["data"][0].pop("i")),
    "trade_data_not_list": _mutate(_TRADE, lambda m: m.update(data={"x": 1})),
    "kline_confirm_string": _mutate(_KLINE, lambda m: m["data"][0].update(confirm="true")),
    "kline_nan_volume": _mutate(_KLINE, lambda m: m["data"][0].update(volume="nan")),
    "ticker_delta_first": SyntheticMarket("BTCUSDT").ticker_delta(),
    "ticker_garbage_rate": _mutate(SyntheticMarket("BTCUSDT").ticker_snapshot(),
                                   lambda m: m["data"].update(fundingRate="abc")),
}
KINDS = {"malformed_json": "malformed_json", "not_an_object": "not_an_object", "unknown_topic": "unknown_topic",
         "unknown_topic_depth": "unknown_topic", "unknown_symbol": "unknown_symbol",
         "missing_field": "missing_field", "missing_ts": "missing_field", "negative_size": "negative_size",
         "nan_size": "not_finite", "inf_price": "not_finite", "garbage_price": "invalid_decimal",
         "number_not_string": "wrong_type", "level_not_pair": "wrong_type", "level_is_string": "wrong_type",
         "u_is_string": "wrong_type", "ts_is_float": "wrong_type", "symbol_mismatch": "symbol_mismatch",
         "trade_negative_size": "negative_size", "trade_bad_side": "invalid_side",
         "trade_missing_id": "missing_field", "trade_data_not_list": "wrong_type",
         "kline_confirm_string": "wrong_type", "kline_nan_volume": "not_finite",
         "ticker_delta_first": "ticker_delta_before_snapshot", "ticker_garbage_rate": "invalid_decimal"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_a_parse_error_with_a_stable_kind(case):
    p = BybitParser(symbols=["BTCUSDT", "ETHUSDT"])
    with pytest.raises(ParseError) as err:
        events_of(p, BAD[case])
    assert err.value.kind == KINDS[case], err.value.reason
    assert err.value.reason


def test_a_bad_trade_message_leaves_no_trace_in_the_dedupe_memory():
    m = SyntheticMarket("BTCUSDT", seed=9)
    good = m.trades(2)
    bad = _mutate(good, lambda x: x["data"][1].update(v="-1"))
    p = BybitParser()
    with pytest.raises(ParseError):
        events_of(p, bad)
    assert len(events_of(p, good)) == 2  # the first trade of the bad message was not remembered


def test_parser_state_is_per_symbol():
    a, b = SyntheticMarket("BTCUSDT", seed=1), SyntheticMarket("ETHUSDT", seed=2)
    p = BybitParser()
    events_of(p, a.ticker_snapshot())
    with pytest.raises(ParseError):
        events_of(p, b.ticker_delta())
    events_of(p, b.ticker_snapshot())
    assert events_of(p, b.ticker_delta())[0][1]["symbol"] == "ETHUSDT"
