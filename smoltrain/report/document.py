"""A report as a list of blocks (headings, text, tables, images, code) rendered twice: markdown
that references PNGs beside it, and one self-contained HTML file with the PNGs embedded as base64.

Building blocks instead of parsing markdown keeps both renderings exact without a markdown library.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from smoltrain.files import write_atomic


@dataclass
class Block:
    kind: str  # heading | text | bullets | table | image | code
    content: Any
    level: int = 2
    caption: str = ""


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers for tables: ints with thousands separators, floats with `digits` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{max(digits - 1, 1)}e}"
        return f"{value:.{digits}g}"
    return str(value)


@dataclass
class Report:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> "Report":
        self.blocks.append(Block("heading", text, level=level))
        return self

    def text(self, text: str) -> "Report":
        self.blocks.append(Block("text", text))
        return self

    def bullets(self, items: Sequence[str]) -> "Report":
        self.blocks.append(Block("bullets", list(items)))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> "Report":
        cells = [[format_value(v) for v in row] for row in rows]
        self.blocks.append(Block("table", (list(headers), cells)))
        return self

    def image(self, path: str | os.PathLike, caption: str = "") -> "Report":
        self.blocks.append(Block("image", Path(path), caption=caption))
        return self

    def code(self, text: str) -> "Report":
        self.blocks.append(Block("code", text))
        return self

    # ------------------------------------------------------------------------- markdown

    def to_markdown(self, relative_to: Path) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b.kind == "heading":
                out += ["#" * b.level + " " + b.content, ""]
            elif b.kind == "text":
                out += [b.content, ""]
            elif b.kind == "bullets":
                out += [f"- {item}" for item in b.content] + [""]
            elif b.kind == "table":
                headers, rows = b.content
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif b.kind == "image":
                out += [f"![{Path(b.content).stem}]({os.path.relpath(b.content, relative_to)})", ""]
                if b.caption:
                    out += [f"*{b.caption}*", ""]
            elif b.kind == "code":
                out += ["```", b.content.rstrip("\n"), "```", ""]
        return "\n".join(out)

    # ------------------------------------------------------------------------- html

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            if b.kind == "heading":
                level = min(max(b.level, 1), 6)
                body.append(f"<h{level}>{_inline(b.content)}</h{level}>")
            elif b.kind == "text":
                body.append(f"<p>{_inline(b.content)}</p>")
            elif b.kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.content) + "</ul>")
            elif b.kind == "table":
                headers, rows = b.content
                head = "".join(f"<th>{_inline(h)}</th>" for h in headers)
                rows_html = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
            elif b.kind == "image":
                data = base64.b64encode(Path(b.content).read_bytes()).decode("ascii")
                caption = f"<figcaption>{html.escape(b.caption)}</figcaption>" if b.caption else ""
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">{caption}</figure>')
            elif b.kind == "code":
                body.append(f"<pre>{html.escape(b.content)}</pre>")
        return _HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))

    def write(self, out_dir: str | os.PathLike, stem: str = "report") -> tuple[Path, Path]:
        """Write `<stem>.md` and `<stem>.html` into out_dir (images must already exist); returns both paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        md_path, html_path = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
        write_atomic(md_path, self.to_markdown(out_dir))
        write_atomic(html_path, self.to_html())
        return md_path, html_path


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    """The inline markdown our reports use (`code`, **bold**), escaped for HTML."""
    text = html.escape(str(text))
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1000px; margin: 2em auto;
       padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }} figcaption {{ color: #666; font-size: 0.9em; }}
pre {{ background: #f6f8fa; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }}
code {{ background: #f6f8fa; padding: 0 3px; }}
</style></head>
<body>
{body}
</body></html>
"""
