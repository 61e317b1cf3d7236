"""The results page of a spoken image search: one self-contained HTML file.

Everything is inside the file (no server, no network, opens from disk): per query an audio
player whose source is the query as the model heard it (16 kHz mono, 16-bit WAV in a base64
data URI), the query's transcript when known, and the ranked images as base64 JPEG thumbnails
with rank, score and path. An image that can no longer be read is shown as a labelled box.
"""

import base64
import datetime
import html
import io
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

THUMBNAIL_PX = 256


@dataclass
class PageResult:
    rank: int
    score: float
    path: str           # as shown (relative to the index root)
    absolute_path: str  # read for the thumbnail


@dataclass
class PageQuery:
    name: str
    waveform: np.ndarray  # (T,) float32 mono
    sample_rate: int
    transcript: Optional[str] = None
    results: List[PageResult] = field(default_factory=list)


def wav_data_uri(waveform: np.ndarray, sample_rate: int) -> str:
    """(T,) float samples -> "data:audio/wav;base64,..." (16-bit PCM, clipped to [-1, 1])."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0), int(sample_rate),
             format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_data_uri(path: str, size: int = THUMBNAIL_PX) -> Optional[str]:
    """An image file -> "data:image/jpeg;base64,..." at most ``size`` px wide and high, or None
    when the file cannot be read (the page then shows a labelled box instead)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:  # missing, unreadable or truncated since it was indexed
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
header p { color: #555; margin: 0.2em 0; }
section.query { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 1em; margin: 1.2em 0; }
section.query h2 { font-size: 1.1em; margin: 0 0 0.5em 0; }
.transcript { font-style: italic; margin: 0.5em 0; }
.results { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 0.8em; }
figure { margin: 0; width: 180px; }
figure img { width: 180px; height: 180px; object-fit: contain; background: #eee; border-radius: 4px; display: block; }
figure .missing { width: 180px; height: 180px; background: #eee; color: #a00; display: flex;
                  align-items: center; justify-content: center; text-align: center; font-size: 0.8em; }
figcaption { font-size: 0.8em; margin-top: 4px; word-break: break-all; }
figcaption .rank { font-weight: bold; }
"""


def render_page(queries: Sequence[PageQuery], title: str = "Spoken image search", subtitle: str = "") -> str:
    """The whole page as one HTML string."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<header><h1>{esc(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p>{esc(subtitle)}</p>")
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    count = f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}"
    parts.append(f"<p>{count}; generated {esc(generated)}</p></header>")
    for qi, query in enumerate(queries, start=1):
        parts.append(f'<section class="query" id="query-{qi}">')
        parts.append(f"<h2>Query {qi}: {esc(query.name)}</h2>")
        parts.append(f'<audio controls preload="auto" src="{wav_data_uri(query.waveform, query.sample_rate)}"></audio>')
        if query.transcript:
            parts.append(f'<p class="transcript">&ldquo;{esc(query.transcript)}&rdquo;</p>')
        parts.append('<div class="results">')
        for result in query.results:
            uri = thumbnail_data_uri(result.absolute_path)
            if uri is None:
                picture = f'<div class="missing">cannot read<br>{esc(result.path)}</div>'
            else:
                picture = f'<img src="{uri}" alt="{esc(result.path)}" title="{esc(result.absolute_path)}">'
            parts.append(
                f'<figure class="result">{picture}<figcaption><span class="rank">#{result.rank}</span> '
                f'&middot; score {result.score:.3f}<br>{esc(result.path)}</figcaption></figure>')
        parts.append("</div></section>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
