"""A local RSS 2.0 / Atom feed server with realistic crypto headlines on a schedule.

So the pipeline and the tests run without the internet. ``GET /feeds/<name>.rss`` and
``/feeds/<name>.atom`` serve the newest stories of that feed (``headlines.HeadlineCatalog``: new
ones appear over time). Every response carries an ``ETag`` and a ``Last-Modified`` (the newest
story's time); ``If-None-Match`` (checked first, RFC 9110) or ``If-Modified-Since`` that still match
get ``304 Not Modified`` with no body.

Faults, per request (``?fault=``) or per feed (``server.faults[name] = ...``):
``malformed`` (the document cut off inside an item), ``html`` (an HTML page instead of a feed),
``nodate`` (items without any date), ``duplicate`` (an item repeated with the same guid),
``huge`` (an item with a 300 KB summary and one with a 5,000-character title), ``error``
(503 with Retry-After: 1), ``slow`` (answers after ``slow_s`` seconds).

``GET /`` lists the feeds; ``GET /healthz`` answers ok. ``stats`` counts requests, 200s and 304s
per feed (the tests check that conditional requests really happen).
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from connectors.news.headlines import HeadlineCatalog, Story

FAULTS = ("malformed", "html", "nodate", "duplicate", "huge", "error", "slow")
FEED_TITLES = {"cryptonews": "Cryptonews (simulated)", "coindesk": "CoinDesk (simulated)",
               "cointelegraph": "Cointelegraph (simulated)"}
# the default local set: two RSS feeds and one Atom feed
DEFAULT_FORMATS = {"cryptonews": "rss", "coindesk": "rss", "cointelegraph": "atom"}


def _http_date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(math.floor(ts), UTC), usegmt=True)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dated(s: Story) -> bool:
    return not math.isnan(s.published_s)


def render_rss(name: str, stories: list[Story], *, dates: bool = True, base: str = "") -> str:
    items = []
    for s in stories:
        date = f"<pubDate>{_http_date(s.published_s)}</pubDate>" if dates and _dated(s) else ""
        items.append(
            f"<item><title>{escape(s.title)}</title><link>{escape(s.url)}</link>"
            f'<guid isPermaLink="false">{escape(s.guid)}</guid>{date}'
            f"<description>{escape('<p>' + escape(s.summary) + '</p>')}</description>"
            f"<category>{escape(s.category)}</category></item>")
    newest = max((s.published_s for s in stories if _dated(s)), default=0.0)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0"><channel>'
            f"<title>{escape(FEED_TITLES.get(name, name))}</title><link>{escape(base)}/</link>"
            f"<description>Simulated crypto headlines for tickcast</description>"
            f"<lastBuildDate>{_http_date(newest)}</lastBuildDate>\n" + "\n".join(items) + "\n</channel></rss>\n")


def render_atom(name: str, stories: list[Story], *, dates: bool = True, base: str = "") -> str:
    entries = []
    for s in stories:
        date = (f"<published>{_iso(s.published_s)}</published><updated>{_iso(s.published_s)}</updated>"
                if dates and _dated(s) else "")
        entries.append(
            f'<entry><title>{escape(s.title)}</title><link rel="alternate" href="{escape(s.url)}"/>'
            f"<id>urn:tickcast:{escape(s.guid)}</id>{date}"
            f'<summary type="html">{escape("<p>" + escape(s.summary) + "</p>")}</summary></entry>')
    newest = max((s.published_s for s in stories if _dated(s)), default=0.0)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<feed xmlns="http://www.w3.org/2005/Atom">'
            f"<title>{escape(FEED_TITLES.get(name, name))}</title><id>urn:tickcast:{escape(name)}</id>"
            f'<link rel="alternate" href="{escape(base)}/"/><updated>{_iso(newest)}</updated>\n'
            + "\n".join(entries) + "\n</feed>\n")


class LocalFeedServer:
    """``with LocalFeedServer() as srv: srv.url("cryptonews")``; ``clock`` drives the schedule."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, catalog: HeadlineCatalog | None = None,
                 clock: Callable[[], float] = time.time, items_per_feed: int = 20, slow_s: float = 5.0,
                 formats: dict[str, str] | None = None):
        self.catalog = catalog or HeadlineCatalog()
        self.clock = clock
        self.items_per_feed = items_per_feed
        self.slow_s = slow_s
        self.formats = dict(formats or DEFAULT_FORMATS)
        self.faults: dict[str, str] = {}
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # a slow-fault request must not hold up stop()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def url(self, name: str, fmt: str | None = None, fault: str | None = None) -> str:
        fmt = fmt or self.formats.get(name, "rss")
        return f"{self.base_url}/feeds/{name}.{fmt}" + (f"?fault={fault}" if fault else "")

    def feed_specs(self) -> list[str]:
        """``name=url`` for every catalog feed (the connector's feed-list format)."""
        return [f"{n}={self.url(n)}" for n in self.catalog.feeds]

    def start(self) -> LocalFeedServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="newsfeed",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> LocalFeedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def count(self, what: str) -> int:
        with self._lock:
            return self.stats[what]

    # -- responses ---------------------------------------------------------------------------------
    def respond(self, path: str, query: dict[str, list[str]], headers) -> tuple[int, dict[str, str], bytes]:
        if path == "/healthz":
            return 200, {"Content-Type": "text/plain"}, b"ok\n"
        if path == "/":
            links = "".join(f'<li><a href="/feeds/{n}.{self.formats.get(n, "rss")}">{n}</a></li>'
                            for n in self.catalog.feeds)
            return 200, {"Content-Type": "text/html; charset=utf-8"}, f"<ul>{links}</ul>".encode()
        if not path.startswith("/feeds/") or "." not in path:
            return 404, {"Content-Type": "text/plain"}, b"not found\n"
        name, _, fmt = path[len("/feeds/"):].rpartition(".")
        if name not in self.catalog.feeds or fmt not in ("rss", "atom", "xml"):
            return 404, {"Content-Type": "text/plain"}, b"no such feed\n"
        fault = (query.get("fault") or [self.faults.get(name, "")])[0]
        if fault and fault not in FAULTS:
            return 400, {"Content-Type": "text/plain"}, f"unknown fault {fault!r}; one of {FAULTS}\n".encode()
        with self._lock:
            self.stats[f"{name}:requests"] += 1
        if fault == "error":
            return 503, {"Retry-After": "1", "Content-Type": "text/plain"}, b"service unavailable\n"
        if fault == "slow":
            time.sleep(self.slow_s)
        now = self.clock()
        stories = self.catalog.items(name, now, self.items_per_feed)
        newest = max((s.published_s for s in stories if _dated(s)), default=self.catalog.epoch_s)
        etag = '"' + hashlib.sha256(f"{name}|{fmt}|{fault}|{[s.guid for s in stories]}".encode()).hexdigest()[:20] + '"'
        cache = {"ETag": etag, "Last-Modified": _http_date(newest)}
        inm = headers.get("If-None-Match")
        ims = headers.get("If-Modified-Since")
        if inm is not None:
            fresh = inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]
        elif ims is not None:
            try:
                fresh = math.floor(newest) <= parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError):
                fresh = False
        else:
            fresh = False
        if fresh and fault not in ("malformed", "html"):
            with self._lock:
                self.stats[f"{name}:304"] += 1
            return 304, cache, b""
        with self._lock:
            self.stats[f"{name}:200"] += 1
        if fault == "html":
            return 200, {"Content-Type": "text/html; charset=utf-8"}, b"<html><body><h1>Maintenance</h1></body></html>"
        if fault == "duplicate" and stories:
            stories = stories + [stories[0]]
        if fault == "huge":
            big = Story(-10_000, name, now - 1, "Huge summary item", "Bitcoin " + "lorem ipsum " * 25_000,
                        f"https://{name}.news.invalid/huge/summary", f"{name}-huge-summary", "bait")
            long_title = Story(-10_001, name, now - 1, "Ethereum " * 600, "A title of 5,400 characters.",
                               f"https://{name}.news.invalid/huge/title", f"{name}-huge-title", "bait")
            stories = [big, long_title] + stories
        render = render_atom if fmt == "atom" else render_rss
        body = render(name, stories, dates=fault != "nodate", base=self.base_url).encode()
        ctype = "application/atom+xml; charset=utf-8" if fmt == "atom" else "application/rss+xml; charset=utf-8"
        if fault == "malformed":
            # cut inside the third item's title: the document ends mid-element
            marker = b"<title>"
            pos = -1
            for _ in range(4):
                pos = body.find(marker, pos + 1)
            body = body[: pos + len(marker) + 12] if pos > 0 else body[: len(body) // 2]
            body += b"<unclosed attr='x>"
        return 200, {"Content-Type": ctype, **cache}, body

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "tickcast-newsfeed/0.1"

            def do_GET(self):
                parts = urlsplit(self.path)
                status, headers, body = server.respond(parts.path, parse_qs(parts.query), self.headers)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if status != 304:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if status != 304:
                    self.wfile.write(body)

            def log_message(self, *args):  # quiet: the stats say what happened
                pass

        return Handler
