"""The seen-item store: dedupe across polls, sources and restarts, bounded, in one small file.

Keys (made in ``normalise.py``): ``u:`` canonical URL, ``t:`` normalised title, ``g:<source>:`` the
feed's own guid, ``d:`` a reported duplicate. Each maps to (first-seen ms, item id, source). An item
is a repeat when its URL or guid key is known, or its title key was first seen within
``title_window_ms`` (the same headline from another source is the same story; the same generic
headline days later, "Bitcoin price today", is not). A guid that comes back with another URL and
title is a feed reusing ids: reported as ``duplicate_id``.

The store keeps the newest ``max_keys`` keys (insertion order) and, per feed, the HTTP validators
(ETag, Last-Modified) and whether the feed has been fetched before. ``save()`` writes it atomically
(temp file + rename), so a crash leaves the previous state; a corrupt file is set aside and the
store starts empty (items may then be published again: at-least-once; the news features drop
repeated item ids).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

from tickcast.logs import get_logger

log = get_logger("news.dedupe")

TITLE_WINDOW_MS = 24 * 3600 * 1000
STATE_VERSION = 1


class SeenStore:
    def __init__(self, path: Path | None = None, *, max_keys: int = 20_000, title_window_ms: int = TITLE_WINDOW_MS):
        self.path = Path(path) if path is not None else None
        self.max_keys = max_keys
        self.title_window_ms = title_window_ms
        self._keys: OrderedDict[str, tuple[int, str, str]] = OrderedDict()
        self.feeds: dict[str, dict] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            self._load()

    def __len__(self) -> int:
        return len(self._keys)

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"state version {state.get('version')!r}, expected {STATE_VERSION}")
            for key, ms, item_id, source in state["keys"]:
                self._keys[str(key)] = (int(ms), str(item_id), str(source))
            self.feeds = {str(k): dict(v) for k, v in state.get("feeds", {}).items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_suffix(self.path.suffix + ".corrupt")
            os.replace(self.path, aside)
            self._keys.clear()
            self.feeds = {}
            log.error("seen-item state unreadable; starting empty", extra={"path": str(self.path),
                                                                             "moved_to": str(aside),
                                                                             "error": str(exc)})

    def lookup(self, keys: tuple[str, ...], now_ms: int) -> tuple[str, tuple[int, str, str]] | None:
        """The first key of ``keys`` that makes the item a repeat, with what it maps to, else None."""
        for key in keys:
            hit = self._keys.get(key)
            if hit is None:
                continue
            if key.startswith("t:") and now_ms - hit[0] > self.title_window_ms:
                continue
            return key, hit
        return None

    def mark(self, keys: tuple[str, ...], now_ms: int, item_id: str, source: str) -> None:
        for key in keys:
            self._keys.pop(key, None)
            self._keys[key] = (now_ms, item_id, source)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        self.dirty = True

    def feed(self, name: str) -> dict:
        return self.feeds.setdefault(name, {})

    def set_feed(self, name: str, **values) -> None:
        state = self.feed(name)
        for k, v in values.items():
            if state.get(k) != v:
                state[k] = v
                self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        state = {"version": STATE_VERSION, "feeds": self.feeds,
                 "keys": [[k, *v] for k, v in self._keys.items()]}
        with open(tmp, "w") as fh:
            json.dump(state, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.dirty = False
