"""``tickcast news`` (the feed poller publishing on market.news) and ``tickcast newsfeed`` (the local
RSS/Atom server). Only typer and the standard library at module level."""
from __future__ import annotations

import typer

from tickcast.clitools import settings_or_exit as _settings


def news(local: bool = typer.Option(None, "--local/--internet",
                                    help="poll the local feed server (default: when TICKCAST_SOURCE=local)"),
         bootstrap: str = typer.Option(None, help="default: KAFKA_BOOTSTRAP"),
         once: bool = typer.Option(False, help="fetch every feed once, publish, and exit")) -> None:
    """Poll the news feeds and publish NewsItem records (one per symbol) on market.news.

    Standalone: numbers records with its own gateway Publisher (gw_seq restored from Kafka), so it
    must not run beside a gateway that publishes the same symbols; there the gateway runs the news
    input itself (connectors.news.publish.run_news_input)."""
    import asyncio

    from connectors.news.connector import FeedSpec, NewsConnector, SourceWeights, parse_feed_specs
    from connectors.news.dedupe import SeenStore
    from connectors.news.feedserver import DEFAULT_FORMATS
    from connectors.news.publish import run_news_input
    from tickcast.logs import get_logger

    s = _settings()
    log = get_logger("news")
    bootstrap = bootstrap or s.kafka_bootstrap
    if not bootstrap:
        typer.echo("no broker: set KAFKA_BOOTSTRAP or pass --bootstrap", err=True)
        raise typer.Exit(2)
    if local is None:
        local = s.source == "local"
    if local:
        base = s.news_local_url.rstrip("/")
        feeds = [FeedSpec(n, f"{base}/feeds/{n}.{fmt}", f"sim.news.{n}") for n, fmt in DEFAULT_FORMATS.items()]
    else:
        feeds = parse_feed_specs(s.news_feeds)
    from connectors.publisher import Publisher, restore_next_seq
    from tickcast.serde import default_serde

    serde = default_serde()
    publisher = Publisher(bootstrap, serde=serde, next_seq=restore_next_seq(bootstrap, s.symbols, serde))

    async def wait_delivered() -> bool:
        return await asyncio.to_thread(publisher.flush, 30.0) == 0

    async def main() -> dict:
        connector = NewsConnector(feeds, store=SeenStore(s.data_dir / "news" / "seen.json"),
                                  weights=SourceWeights(s.news_source_weights, s.news_default_weight),
                                  poll_interval_s=s.news_poll_interval_s)
        async with connector:
            return await run_news_input(connector, publisher, list(s.symbols), wait_delivered=wait_delivered,
                                        max_batches=len(feeds) if once else None)

    try:
        totals = asyncio.run(main())
    except KeyboardInterrupt:
        totals = {}
    finally:
        left = publisher.flush(30.0)
    log.info("news poller stopped", extra={"counts": {**totals, "undelivered": left, **publisher.counts()}})
    if left:
        raise typer.Exit(1)


def newsfeed(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8790),
             period: float = typer.Option(60.0, help="seconds between stories across all feeds"),
             seed: int = typer.Option(7), backlog: int = typer.Option(20, help="stories already out at start")) -> None:
    """Serve simulated crypto headlines as RSS/Atom feeds (ETag/Last-Modified, 304s, ?fault=...)."""
    import signal
    import threading

    from connectors.news.feedserver import LocalFeedServer
    from connectors.news.headlines import HeadlineCatalog

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalFeedServer(host, port, catalog=HeadlineCatalog(seed=seed, period_s=period, backlog=backlog)) as srv:
        for spec in srv.feed_specs():
            typer.echo(spec)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    app.command()(news)
    app.command()(newsfeed)
