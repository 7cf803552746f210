"""Small HTML helpers of the report: escaping, number formatting, tables, badges and embedded figures."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnscope.core.stats import median

FIGURE_CAPTIONS = {
    "kernel_curves": "Offset kernel κ(d) = K<sub>n</sub>(n − d) of every head at the reference query position, "
                     "one panel per layer, coloured by category (log-log).",
    "n_eff_heatmap": "Effective kernel width N<sub>eff</sub> = 1 / Σ K² over layers × heads (log scale).",
    "categories": "Kernel category of every head, with the thresholds used.",
    "tv_per_head": "Per head: total-variation distance of the content + position decomposition (median, bar to "
                   "90th percentile) and between the kernel and the mean held-out attention.",
    "denominators": "Kernel-weighted softmax denominators Z<sub>n</sub> on held-out texts, relative to the "
                    "calibration value (1 = the value reused for every text).",
    "r_fvu": "Distribution over the reported neurons of Pearson r and FVU between the full layer-0 explanation "
             "and the true pre-activation, with the random neurons' medians.",
    "neuron_traces": "Full layer-0 explanation (dashed) vs the true pre-activation for the top neurons, on each "
                     "neuron's most positive and most negative held-out text (grey: the contextual heads alone).",
}
KERNEL_FIGURES = ("kernel_curves", "n_eff_heatmap", "categories", "tv_per_head")
NEURON_FIGURES = ("r_fvu", "neuron_traces")
CIRCUIT_FIGURES = ("denominators",)
WIDE_FIGURES = ("kernel_curves", "tv_per_head", "neuron_traces")


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """Numbers to short text; ``None`` to an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        if a >= 1000:
            return f"{v:.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 10:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def num_html(v: Any) -> str:
    """``data-value`` of a table cell: a plain number, or empty for missing values (sorted last)."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


_WS = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"}


def token_html(tok: str) -> str:
    """A token as escaped HTML with its whitespace made visible (spaces as ␣, newlines as ↵, ...)."""
    if tok == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in tok:
        if ch in _WS:
            out.append(f'<span class="ws">{_WS[ch]}</span>')
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f'<span class="ws">\\x{ord(ch):02x}</span>')
        else:
            out.append(esc(ch))
    return "".join(out)


def plain_json(x: Any) -> Any:
    """JSON-safe copy: tensors/arrays to lists, non-finite floats to ``None``, paths to strings."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): plain_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_json(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return plain_json(dataclasses.asdict(x))
    return x


def json_script(el_id: str, obj: Any) -> str:
    """Data embedded for the page's script; ``<``, ``>`` and ``&`` escaped so no text can close the tag."""
    s = json.dumps(plain_json(obj), separators=(",", ":"), allow_nan=False)
    s = s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{el_id}">{s}</script>'


def value_html(v: Any) -> str:
    if isinstance(v, dict):
        if not v:
            return "—"
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{value_html(x)}</td></tr>" for k, x in v.items())
        return f'<table class="kv nested">{rows}</table>'
    if isinstance(v, (list, tuple)):
        if all(isinstance(x, (int, float, str, bool)) or x is None for x in v) and len(v) <= 64:
            return ", ".join(esc(fmt(x)) for x in v) if v else "—"
        return f"<code>{esc(json.dumps(plain_json(v)))}</code>"
    if isinstance(v, str) and len(v) >= 32 and all(c in "0123456789abcdef" for c in v):
        return f'<code class="hash">{esc(v)}</code>'  # hashes
    return esc(fmt(v))


def kv_table(d: dict, el_id: str | None = None, cls: str = "kv") -> str:
    ident = f' id="{el_id}"' if el_id else ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{value_html(v)}</td></tr>" for k, v in d.items())
    return f'<table{ident} class="{cls}"><tbody>{rows}</tbody></table>'


def badge_html(ok: bool | None, yes: str = "OK", no: str = "FAILED", none: str = "info") -> str:
    if ok is None:
        return f'<span class="badge info">{esc(none)}</span>'
    return f'<span class="badge ok">{esc(yes)}</span>' if ok else f'<span class="badge fail">{esc(no)}</span>'


def embedded_png(data: bytes, colors: int = 256) -> bytes:
    """A PNG made smaller for embedding: flattened onto white and reduced to a ``colors``-colour palette (no
    dithering: the figures are line art and text, which a palette keeps sharp).  The original bytes when that
    is not smaller, or when Pillow cannot read them."""
    from PIL import Image, UnidentifiedImageError

    try:
        im: Image.Image = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError):
        return data
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    q = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    q.save(buf, "PNG", optimize=True)
    return buf.getvalue() if buf.tell() < len(data) else data


def data_uri(path: Path | str) -> str:
    """A figure file as a ``data:`` URI, so that the page holding it is self-contained (PNGs through
    :func:`embedded_png`; the file on disk is left as it is)."""
    p = Path(path)
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        p.suffix.lower(), "image/png")
    data = p.read_bytes()
    if mime == "image/png":
        data = embedded_png(data)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def data_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain data table; ``rows`` hold HTML already escaped."""
    th = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="tablewrap"><table class="data"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def figure_html(name: str, path: Path | str | None) -> str:
    cap = FIGURE_CAPTIONS.get(name, esc(name.replace("_", " ")))
    if path is None or not Path(path).is_file():
        return f'<p class="note">Figure <code>{esc(name)}</code> is missing ({esc(path)}).</p>'
    wide = " wide" if name in WIDE_FIGURES else ""
    return (f'<figure class="fig{wide}" id="fig-{esc(name)}"><img alt="{esc(name)}" src="{data_uri(path)}" '
            f'tabindex="0" title="click to enlarge (Esc or click again to close)">'
            f"<figcaption>{cap}</figcaption></figure>")


def figures_html(names: tuple[str, ...], figures: dict[str, Path], used: set[str]) -> str:
    parts = []
    for n in names:
        if n in figures:
            used.add(n)
            parts.append(figure_html(n, figures[n]))
    return f'<div class="figs">{"".join(parts)}</div>' if parts else ""


def median_of(xs: Sequence[float | None]) -> float | None:
    """The finite values' median by the package's one convention (:func:`attnscope.core.stats.median`)."""
    return median(x for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x))


def worst_of(recs: list, key) -> tuple[float | None, str]:
    """Largest ``key(record)`` over head records and the head's label (``L0H3``)."""
    vals = [(key(r), r) for r in recs if key(r) is not None and math.isfinite(key(r))]
    if not vals:
        return None, ""
    v, r = max(vals, key=lambda t: t[0])
    return v, f"L{r.layer}H{r.head}"
