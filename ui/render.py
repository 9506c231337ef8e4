"""Small HTML fragments for the dashboard's text panes (pure functions; every value is escaped).

Elements carry ``data-testid`` attributes so the browser test can find the numbers it checks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ui.shaping import STATUS_COLORS, esc

CSS = """
.bk-clearfix{display:block!important;width:100%}
.tc-banner{padding:8px 14px;border-radius:6px;margin:4px 0;font-weight:600;font-family:sans-serif}
.tc-banner.sim{background:#fff3e0;color:#e65100;border:2px solid #ff9800}
.tc-banner.error{background:#ffebee;color:#b71c1c;border:2px solid #e53935}
.tc-banner.warn{background:#fffde7;color:#8d6e00;border:1px solid #fbc02d}
.tc-banner.info{background:#e3f2fd;color:#0d47a1;border:1px solid #64b5f6}
.tc-cards{display:flex;flex-wrap:wrap;gap:8px;font-family:sans-serif}
.tc-card{border:1px solid #ddd;border-radius:6px;padding:6px 10px;min-width:120px;background:#fafafa}
.tc-card .l{font-size:11px;color:#666;text-transform:uppercase;letter-spacing:.03em}
.tc-card .v{font-size:19px;font-weight:600;color:#222}
.tc-card .s{font-size:11px;color:#555}
.tc-table{border-collapse:collapse;font-family:sans-serif;font-size:12px;width:100%}
.tc-table th{text-align:left;border-bottom:2px solid #ccc;padding:3px 6px;background:#f5f5f5}
.tc-table td{border-bottom:1px solid #eee;padding:3px 6px}
.tc-badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:11px;font-weight:600}
.tc-empty{padding:28px;text-align:center;color:#555;border:1px dashed #bbb;border-radius:8px;
 font-family:sans-serif;font-size:15px;background:#fcfcfc}
.tc-note{font-family:sans-serif;font-size:12px;color:#555}
.tc-status{font-family:sans-serif;font-size:12px;color:#444}
.tc-buy{color:#1b8a7a;font-weight:700}.tc-sell{color:#d32f2f;font-weight:700}.tc-flat{color:#777;font-weight:700}
"""


def banner(kind: str, text: str, testid: str) -> str:
    return f'<div class="tc-banner {esc(kind)}" data-testid="{esc(testid)}">{esc(text)}</div>'


def empty(text: str, testid: str = "empty-state") -> str:
    return f'<div class="tc-empty" data-testid="{esc(testid)}">{esc(text)}</div>'


def note(text: str) -> str:
    return f'<div class="tc-note">{esc(text)}</div>'


def cards(items: Sequence[tuple[str, str, str, str]]) -> str:
    """(label, value, subtitle, testid) cards."""
    out = ['<div class="tc-cards">']
    for label, value, sub, testid in items:
        out.append(f'<div class="tc-card" data-testid="{esc(testid)}"><div class="l">{esc(label)}</div>'
                   f'<div class="v" data-testid="{esc(testid)}-value">{esc(value)}</div>'
                   f'<div class="s">{esc(sub)}</div></div>')
    out.append("</div>")
    return "".join(out)


def badge(status: str) -> str:
    color = STATUS_COLORS.get(status, STATUS_COLORS["unknown"])
    return f'<span class="tc-badge" style="background:{color}">{esc(status)}</span>'


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], testid: str, raw_cols: Sequence[int] = ()) -> str:
    """An HTML table; cells in ``raw_cols`` are trusted HTML built here (badges), the rest escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = "".join(f"<td>{c if i in raw_cols else esc(c)}</td>" for i, c in enumerate(r))
        body.append(f"<tr>{cells}</tr>")
    return (f'<table class="tc-table" data-testid="{esc(testid)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def action_html(action: str | None) -> str:
    a = (action or "none").upper()
    cls = {"BUY": "tc-buy", "SELL": "tc-sell"}.get(a, "tc-flat")
    return f'<span class="{cls}" data-testid="signal-action">{esc(a)}</span>'


def kv(mapping: Mapping[str, Any]) -> str:
    return ", ".join(f"{esc(k)}={esc(v)}" for k, v in mapping.items())
