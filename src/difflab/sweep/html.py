"""A self-contained HTML page: paragraphs, a table sortable by any column, and pictures embedded
as data URIs, with its CSS and script inline, so the file alone shows everything, offline, after
it is copied or mailed anywhere."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from difflab.checkpoint import atomic_write_text


@dataclass
class Cell:
    text: str
    sort: Optional[float] = None  # the number a column sorts by; None: sorted by the text


@dataclass
class Row:
    cells: list[Cell]
    marks: list[str] = field(default_factory=list)  # css classes: best, tied, failed


@dataclass
class Picture:
    caption: str
    path: Optional[Path]  # None or unreadable: a grey box saying `missing`
    missing: str = "no picture"


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1800px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
p.answer { font-size: 16px; background: #eef6ee; border-left: 4px solid #3a3; padding: 8px 12px; }
div.table { overflow-x: auto; max-width: 100%; } table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; white-space: nowrap; }
th { background: #f2f2f2; cursor: pointer; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
tr.best td { background: #dff3df; font-weight: 600; } tr.tied td { background: #f3f3d8; }
tr.failed td, tr.interrupted td, tr.incomplete td, tr.unreadable td { color: #a00; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 6px; vertical-align: top; text-align: center; }
figure img { image-rendering: pixelated; border: 1px solid #ddd; max-width: 100%; } figure.plot { display: block; }
figure.job img { width: 256px; } figcaption { font-size: 12px; max-width: 300px; }
.missing { width: 256px; height: 128px; background: #e1e1e1; display: flex; align-items: center; justify-content: center; }
"""

# Click a header: sort by that column (numbers by data-sort), click again: the other way.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = !th.classList.contains("asc");
  th.parentNode.querySelectorAll("th").forEach(h => h.classList.remove("asc", "desc"));
  th.classList.add(asc ? "asc" : "desc");
  const key = r => { const c = r.cells[col], v = c.dataset.sort; return v === undefined ? c.textContent : parseFloat(v); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    const d = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y), undefined, {numeric: true});
    return asc ? d : -d; }).forEach(r => body.appendChild(r));
}));
"""


def inline_markup(text: str) -> str:
    """Escaped text with **bold** and `code` spans, the markup comparison.md uses."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def data_uri(path: Optional[Path]) -> Optional[str]:
    """The PNG at `path` as a data URI; None when there is none or it cannot be read."""
    try:
        data = path.read_bytes() if path is not None else None
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode() if data else None


def _cell(cell: Cell) -> str:
    if cell.sort is None:
        return f"<td>{inline_markup(cell.text)}</td>"
    return f'<td class="num" data-sort="{cell.sort!r}">{inline_markup(cell.text)}</td>'


def _figure(picture: Picture, css: str) -> str:
    uri = data_uri(picture.path)
    body = f'<img src="{uri}" alt="{html.escape(picture.caption)}">' if uri else \
        f'<div class="missing">{html.escape(picture.missing)}</div>'
    return f'<figure class="{css}">{body}<figcaption>{inline_markup(picture.caption)}</figcaption></figure>'


def write_page(path: Path, title: str, answer: str, paragraphs: list[str], columns: list[str], rows: list[Row],
               plots: list[Picture], samples: list[Picture]) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "\n".join(f'<tr class="{" ".join(r.marks)}">' + "".join(map(_cell, r.cells)) + "</tr>" for r in rows)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        f'<p class="answer">{inline_markup(answer)}</p>', *(f"<p>{inline_markup(p)}</p>" for p in paragraphs),
        "<h2>Jobs (click a column to sort)</h2>",
        f'<div class="table"><table class="sortable"><thead><tr>{head}</tr></thead>', f"<tbody>\n{body}\n</tbody></table></div>",
        "<h2>Metrics against the swept settings, loss curves</h2>", *(_figure(p, "plot") for p in plots),
        "<h2>Each job's samples</h2>", "<div>", *(_figure(p, "job") for p in samples), "</div>",
        f"<script>{SCRIPT}</script>", "</body></html>", ""]
    atomic_write_text(path, "\n".join(parts))
