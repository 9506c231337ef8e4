"""News feeds as a streaming input: RSS/Atom polling, normalisation, dedupe, asset tags, sentiment.

- ``connector.NewsConnector``: conditional polling with backoff -> ``PollResult`` of ``NewsEntry``
  and ``Rejected`` (dead letters), deduplicated by ``dedupe.SeenStore`` across sources and restarts.
- ``assets.tag_assets``: whole-word asset tags; ``sentiment.SentimentScorer`` / ``VaderScorer``.
- ``publish.run_news_input``: NewsItem records (one per market symbol) through the gateway's
  publisher, which owns ``gw_seq``.
- ``feedserver.LocalFeedServer`` + ``headlines.HeadlineCatalog``: local feeds without the internet.
- ``flows/news_features.py``: the windowed news features of one symbol.

Nothing heavy is imported here: ``connectors.news.cli`` is loaded by every ``tickcast`` call.
"""
