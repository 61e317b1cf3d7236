"""The results page of a search: one self-contained HTML file (and the same result cards for the app).

Everything is inside the file (no server, no network, opens from disk): per query an audio
player whose source is the query as the model heard it (16 kHz mono, 16-bit WAV in a base64
data URI) or, for an image query, its thumbnail; the query's transcript when known, and the
ranked results: images as base64 JPEG thumbnails, spoken clips as players, each with rank, score
and path. An image that can no longer be read is shown as a labelled box. When the query's
paired image is known (``PageQuery.paired``), its card is marked and the query says its rank.

File names are shortened in the middle (the extension stays visible) and never broken across
lines; the full path is the card's tooltip.
"""

import base64
import datetime
import html
import io
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import soundfile as sf
from PIL import Image

THUMBNAIL_PX = 256
NAME_CHARS = 20  # longest file name shown whole on a 180 px card (at 0.8em); longer ones lose their middle


@dataclass
class PageResult:
    rank: int
    score: float
    path: str  # as shown (relative to the index root)
    absolute_path: str  # read for the thumbnail
    detail: str = ""  # e.g. "cosine 0.412 · match 3.10" (shown under the score)
    waveform: Optional[np.ndarray] = None  # a spoken clip: (T,) float32 mono, played on the card
    sample_rate: int = 16000
    score_label: str = "score"
    # why this result (:func:`explanation_view`): {"overlay", "saliency" (data URIs or None), "label", "kind"}
    explanation: Optional[dict] = None


@dataclass
class PageQuery:
    name: str
    waveform: Optional[np.ndarray] = None  # (T,) float32 mono (a spoken query)
    sample_rate: int = 16000
    transcript: Optional[str] = None
    results: List[PageResult] = field(default_factory=list)
    image_path: Optional[str] = None  # an image query: shown as a thumbnail
    paired: Optional[str] = None  # the query's paired result, as PageResult.path shows it


def wav_data_uri(waveform: np.ndarray, sample_rate: int) -> str:
    """(T,) float samples -> "data:audio/wav;base64,..." (16-bit PCM, clipped to [-1, 1])."""
    buf = io.BytesIO()
    sf.write(
        buf,
        np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0),
        int(sample_rate),
        format="WAV",
        subtype="PCM_16",
    )
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_data_uri(path: str, size: int = THUMBNAIL_PX) -> Optional[str]:
    """An image file -> "data:image/jpeg;base64,..." at most ``size`` px wide and high, or None
    when the file cannot be read (the page then shows a labelled box instead)."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception:  # missing, unreadable or truncated since it was indexed
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heat(values: np.ndarray, size) -> Image.Image:
    """Values in [0, 1] (a grid, or a 1-row strip) -> an RGB heat image of ``size`` (w, h), smoothly
    upsampled, coloured dark blue (0) through yellow to red (1) by PIL's ``ImageOps.colorize``."""
    from PIL import ImageOps

    grey = Image.fromarray(np.uint8(np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0) * 255))
    grey = grey.resize(size, Image.BILINEAR)
    return ImageOps.colorize(grey, black="#08306b", mid="#ffd700", white="#d7191c")


def heatmap_overlay_uri(path: str, image_map, size: int = THUMBNAIL_PX, alpha: float = 0.55) -> Optional[str]:
    """An image file with an explanation map (rows, cols in [0, 1]) laid over it as a heat layer
    -> "data:image/png;base64,..." at most ``size`` px, or None when the file cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
    except Exception:
        return None
    return _png_uri(Image.blend(im, _heat(image_map, im.size), alpha))


def saliency_strip_uri(
    waveform: np.ndarray, saliency, frame_seconds: float, sample_rate: int, width: int = 180, height: int = 36
) -> str:
    """The query's waveform (its envelope, one column per pixel) over a strip coloured by a saliency per
    speech frame in [0, 1] (frame ``frame_seconds`` long): which stretch of the query drove the match."""
    from PIL import ImageDraw

    wave = np.asarray(waveform, dtype=np.float32)
    duration = max(len(wave) / float(sample_rate), 1e-6)
    saliency = np.asarray(saliency, dtype=np.float32)
    # the saliency of the frame under each pixel column (frames past the clip's end are dropped)
    columns = np.minimum((np.arange(width) + 0.5) / width * duration / frame_seconds, len(saliency) - 1).astype(int)
    strip = _heat(saliency[columns][None, :], (width, height))
    draw = ImageDraw.Draw(strip)
    edges = np.linspace(0, len(wave), width + 1).astype(int)
    peak = float(np.abs(wave).max()) or 1.0
    for x in range(width):
        chunk = wave[edges[x] : max(edges[x + 1], edges[x] + 1)]
        half = 0.45 * height * float(np.abs(chunk).max()) / peak if len(chunk) else 0.0
        draw.line([(x, height / 2 - half), (x, height / 2 + half)], fill=(255, 255, 255))
    return _png_uri(strip)


def explanation_view(explanation, image_path: str, waveform: Optional[np.ndarray], sample_rate: int) -> dict:
    """An :class:`~cmd_plugin.retrieval.explain.Explanation` as a result card shows it."""
    saliency = None
    if explanation.speech_saliency is not None and waveform is not None:
        saliency = saliency_strip_uri(waveform, explanation.speech_saliency, explanation.frame_seconds, sample_rate)
    return {
        "overlay": heatmap_overlay_uri(image_path, explanation.image_map),
        "saliency": saliency,
        "label": explanation.label,
        "kind": explanation.kind,
    }


def short_name(name: str, limit: int = NAME_CHARS) -> str:
    """``name`` whole when at most ``limit`` characters, else its start and end around an
    ellipsis, the end (extension included) kept longer: "a3c9f0e1…e77b581f.jpg"."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) * 3 // 5
    head = limit - 1 - tail
    return name[:head] + "\u2026" + name[-tail:]


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
header p { color: #555; margin: 0.2em 0; }
section.query { background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 1em; margin: 1.2em 0; }
section.query h2 { font-size: 1.1em; margin: 0 0 0.5em 0; }
.transcript { font-style: italic; margin: 0.5em 0; }
.paired-note { margin: 0.3em 0; color: #1a5e20; }
.query-image { max-width: 256px; max-height: 256px; border-radius: 4px; display: block; }
.results { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 0.8em; }
figure.result { margin: 0; width: 180px; padding: 3px; border: 2px solid transparent; border-radius: 6px; }
figure.result.paired { border-color: #2e7d32; background: #e8f5e9; }
figure.result img { width: 180px; height: 180px; object-fit: contain; background: #eee; border-radius: 4px;
                    display: block; }
figure.result audio { width: 180px; display: block; }
figure.result .missing { width: 180px; height: 180px; background: #eee; color: #a00; display: flex;
                         align-items: center; justify-content: center; text-align: center; font-size: 0.8em; }
figcaption { font-size: 0.8em; margin-top: 4px; }
figcaption .rank { font-weight: bold; }
figcaption .badge { background: #2e7d32; color: #fff; border-radius: 3px; padding: 0 4px; margin-left: 4px; }
figcaption .detail { color: #555; }
figcaption .dir, figcaption .name { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
figcaption .dir { color: #777; }
figure.result .explain { margin-top: 4px; }
figure.result .explain img.explain-map { width: 180px; height: 180px; object-fit: contain; }
figure.result .explain img.explain-saliency { width: 180px; height: 36px; display: block; border-radius: 3px; }
figure.result .explain .why { font-size: 0.75em; color: #555; display: block; }
"""


def _esc(text) -> str:
    return html.escape(str(text))


def result_card(result: PageResult, paired: bool = False) -> str:
    """One result as a <figure>: thumbnail (or player for a clip), rank, score, path."""
    if result.waveform is not None:
        media = f'<audio controls preload="metadata" src="{wav_data_uri(result.waveform, result.sample_rate)}"></audio>'
    else:
        uri = thumbnail_data_uri(result.absolute_path)
        if uri is None:
            media = f'<div class="missing">cannot read<br>{_esc(short_name(result.path.rsplit("/", 1)[-1]))}</div>'
        else:
            media = f'<img src="{uri}" alt="{_esc(result.path)}">'
    directory, _, name = result.path.rpartition("/")
    caption = [f'<span class="rank">#{result.rank}</span> &middot; {_esc(result.score_label)} {result.score:.3f}']
    if paired:
        caption.append('<span class="badge">paired</span>')
    if result.detail:
        caption.append(f'<br><span class="detail">{_esc(result.detail)}</span>')
    if directory:
        caption.append(f'<span class="dir">{_esc(directory)}/</span>')
    caption.append(f'<span class="name">{_esc(short_name(name))}</span>')
    if result.explanation and result.explanation.get("overlay"):
        e = result.explanation
        why = [
            f'<div class="explain" data-kind="{_esc(e["kind"])}">',
            f'<img class="explain-map" src="{e["overlay"]}" alt="where the query lands" title="{_esc(e["label"])}">',
        ]
        if e.get("saliency"):
            why.append(f'<img class="explain-saliency" src="{e["saliency"]}" alt="which part of the query drove it">')
        why.append(f'<span class="why">{_esc(e["kind"].replace("_", " "))}: {_esc(e["label"])}</span></div>')
        media += "".join(why)
    cls = "result paired" if paired else "result"
    return (
        f'<figure class="{cls}" title="{_esc(result.absolute_path)}" data-rank="{result.rank}" '
        f'data-path="{_esc(result.path)}">{media}<figcaption>{"".join(caption)}</figcaption></figure>'
    )


def query_section(query: PageQuery, number: int, heading: Optional[str] = None) -> str:
    """One query's block: its player (or image), transcript, paired-image note and result cards."""
    parts = [
        f'<section class="query" id="query-{number}">',
        f"<h2>{_esc(heading if heading is not None else f'Query {number}: {query.name}')}</h2>",
    ]
    if query.waveform is not None:
        parts.append(
            f'<audio class="query-audio" controls preload="auto" '
            f'src="{wav_data_uri(query.waveform, query.sample_rate)}"></audio>'
        )
    if query.image_path is not None:
        uri = thumbnail_data_uri(query.image_path)
        if uri is not None:
            parts.append(f'<img class="query-image" src="{uri}" alt="{_esc(query.name)}">')
    if query.transcript:
        parts.append(f'<p class="transcript">&ldquo;{_esc(query.transcript)}&rdquo;</p>')
    if query.paired:
        rank = next((r.rank for r in query.results if r.path == query.paired), None)
        where = f"at rank {rank}" if rank is not None else f"not in the top {len(query.results)}"
        parts.append(f'<p class="paired-note">paired image {_esc(query.paired)}: {where}</p>')
    parts.append('<div class="results">')
    parts.extend(result_card(r, paired=query.paired is not None and r.path == query.paired) for r in query.results)
    parts.append("</div></section>")
    return "\n".join(parts)


def render_page(queries: Sequence[PageQuery], title: str = "Spoken image search", subtitle: str = "") -> str:
    """The whole page as one HTML string."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<header><h1>{_esc(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p>{_esc(subtitle)}</p>")
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    count = f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}"
    parts.append(f"<p>{count}; generated {_esc(generated)}</p></header>")
    for qi, query in enumerate(queries, start=1):
        parts.append(query_section(query, qi))
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
