"""The local exchange (``tickcast exchange``): a Bybit v5 public WebSocket + REST server and
mempool.space-compatible feeds on 127.0.0.1, driven by a seeded market model or by the replay of a
recording, with fault injection and a per-connection log of every message sent. See README.md here.
"""
from connectors.exchange.drivers import ModelDriver, ReplayDriver
from connectors.exchange.rest import RateLimit
from connectors.exchange.server import FAULT_KINDS, LocalExchange, Sent, ThreadedExchange

__all__ = ["FAULT_KINDS", "LocalExchange", "ModelDriver", "RateLimit", "ReplayDriver", "Sent", "ThreadedExchange"]
