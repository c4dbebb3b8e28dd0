"""What a Textual app shows, as plain text, for tests that drive it with Pilot.

Textual's public way to capture its screen is ``App.export_screenshot()``, an
SVG in which each run of same-styled cells is a ``<text>`` element placed at
a pixel ``x`` on a numbered line. Turning the cells back into columns gives
the screen as a person sees it, without relying on Textual internals.
"""

from __future__ import annotations

import html
import re
from typing import Any

from textual.app import App

_CELL = re.compile(
    r'<text [^>]*?x="(?P<x>[\d.]+)"[^>]*?textLength="(?P<len>[\d.]+)"'
    r'[^>]*?clip-path="url\(#[^)]*-line-(?P<line>\d+)\)"[^>]*>(?P<text>.*?)</text>',
    re.S,
)


def screen_text(app: App[Any]) -> str:
    """The app's current screen, one line of text per terminal row."""
    rows: dict[int, dict[int, str]] = {}
    for m in _CELL.finditer(app.export_screenshot()):
        text = html.unescape(m["text"]).replace("\xa0", " ")
        if not text.strip("\n"):
            continue
        width = float(m["len"]) / len(text)
        row = rows.setdefault(int(m["line"]), {})
        for i, ch in enumerate(text):
            row[round(float(m["x"]) / width) + i] = ch
    return "\n".join(
        "".join(cells.get(c, " ") for c in range(max(cells) + 1)).rstrip()
        for _, cells in sorted(rows.items())
    )
