"""Structured logs: one JSON object per line on stderr, with stage, symbol and counts as fields.

    log = get_logger("gateway")
    log.info("published", extra={"symbol": "BTCUSDT", "counts": {"published": 10}})
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "stage": record.name.removeprefix("tickcast."),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


_configured = False


def configure(level: str | None = None) -> None:
    """Install the JSON handler on the root logger once per process."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("TICKCAST_LOG_LEVEL", "INFO"))
    # third-party INFO chatter (the ONNX exporter logs a line per deduplicated initializer)
    for noisy in ("httpx", "httpcore", "urllib3", "websockets", "asyncio", "bokeh", "tornado", "onnx_ir", "onnxscript",
                  "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True


def get_logger(stage: str) -> logging.Logger:
    configure()
    return logging.getLogger(f"tickcast.{stage}")
