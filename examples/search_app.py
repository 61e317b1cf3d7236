"""The web app of ``examples/search.py serve``: a Gradio page over a :class:`SearchService`.

Speech -> images: record from the microphone or upload a clip (any format soundfile reads), press
Search, see the ranked images (rank, score, path) and hear the query as the model heard it.
Image -> speech (with an index of spoken clips): upload an image, hear the ranked clips. With a
coarse-to-fine checkpoint a checkbox re-ranks the top K with the matching head (K from the
checkpoint's task.valid_rerank_k, else 32). Another checkbox shows, on the top 3 images, where the
query lands (a heatmap: the cosine with each patch's value-path token, docs/grounding.md) and which part of
the query drove it (a strip under the waveform). Every answer shows the time of each step.

Bad input (silence, a clip too short or too long, a file that is not audio or not an image) is
answered with a message in the page; the server goes on serving. What Gradio itself refuses before
the search runs (a number below its minimum, an upload its image box cannot open) is shown with
Gradio's own message (``show_error``); searches never show a traceback. The model runs under
``torch.inference_mode`` in up to ``concurrency`` Gradio worker threads at once (one shared
concurrency group for both directions); the indexes and the model are only read.

UI only: the search itself is :mod:`cmd_plugin.search.service`. Gradio is imported here, never
by ``import cmd_plugin``.
"""

import html
import logging
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine

import gradio as gr  # noqa: E402

from cmd_plugin.inference import InferenceError  # noqa: E402
from cmd_plugin.search.page import STYLE, PageQuery, PageResult, explanation_view, query_section  # noqa: E402

logger = logging.getLogger("search_app")

# system fonts only: the default theme would fetch web fonts from the internet
FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "monospace"]
APP_CSS = (
    STYLE.replace("body {", ".cmd-unused {")
    + """
.cmd-error { background: #fdecea; color: #8a1c14; border: 1px solid #f5c2bd; border-radius: 6px; padding: 0.8em; }
.cmd-timing { font-size: 0.9em; color: #444; }
"""
)


def _error_html(message: str) -> str:
    return f'<div class="cmd-error" role="alert">{html.escape(message)}</div>'


EXPLAIN_TOP = 3  # results shown with where the query lands (a choice: the first row of cards)


def timing_text(timings, rerank=None, method="", explained=0) -> str:
    """ "decoding 3.1 ms · embedding 41.0 ms · search 0.12 ms · re-ranking 80.2 ms · total 125 ms"
    (and "explaining top 3 40.1 ms" when results were explained: the total then includes it)."""
    ms = {k: 1000 * v for k, v in timings.items()}
    parts = [f"decoding {ms['decode']:.1f} ms", f"embedding {ms['embed']:.1f} ms", f"search {ms['search']:.2f} ms"]
    if rerank:
        parts.append(f"re-ranking top {rerank['k']} ({rerank['score']}) {ms['rerank']:.1f} ms")
    if explained:
        parts.append(f"explaining top {explained} {ms['explain']:.1f} ms")
    parts.append(f"total {ms['total']:.0f} ms")
    return " \u00b7 ".join(parts) + (f" ({method} search)" if method else "")


def _cards(answer, clip_waves=None, sample_rate=16000):
    explained = answer.extra.get("explanations", {})
    query = None if answer.query_wave is None else answer.query_wave.numpy()
    cards = []
    for i, h in enumerate(answer.hits):
        detail = f"match {h.match:.3f} \u00b7 cosine {h.cosine:.3f}" if h.reranked else h.note
        cards.append(
            PageResult(
                h.rank,
                h.score,
                h.path,
                h.absolute_path,
                detail=detail,
                waveform=None if clip_waves is None else clip_waves[i],
                sample_rate=sample_rate,
                score_label="re-ranked" if h.reranked else "cosine",
                explanation=(
                    explanation_view(explained[h.rank], h.absolute_path, query, sample_rate)
                    if h.rank in explained
                    else None
                ),
            )
        )
    return cards


def _results_html(section: str, answer, direction: str) -> str:
    return f'<div class="cmd-results" data-direction="{direction}" data-count="{len(answer.hits)}">{section}</div>'


class App:
    """The request handlers (plain methods: testable without a browser) and the Blocks layout."""

    def __init__(self, service, top_k=10, rerank_k=0, rerank_score=None, checkpoint="", concurrency=4):
        self.service = service
        self.top_k = top_k
        self.rerank_on = bool(rerank_k) and service.has_matching_head
        self.rerank_k = rerank_k or service.default_rerank_k
        self.rerank_score = rerank_score or service.default_rerank_score
        self.checkpoint = checkpoint
        self.concurrency = concurrency

    def _options(self, top_k, rerank, rerank_k):
        try:
            top_k, k = int(top_k), int(rerank_k) if rerank else 0
        except (TypeError, ValueError):
            raise InferenceError(f"the number of results and K must be whole numbers, got {top_k!r} and {rerank_k!r}")
        if top_k < 1 or (rerank and k < 1):
            raise InferenceError(f"the number of results and K must be at least 1, got {top_k} and {k}")
        return top_k, k

    def _guarded(self, fn, *args):
        """(timing text, results html): the answer, or a message for bad input; never a traceback."""
        try:
            return fn(*args)
        except (InferenceError, ValueError, FileNotFoundError) as err:  # SearchIndexError is a ValueError
            return "", _error_html(str(err))
        except Exception as err:  # a bug: logged with its traceback here, one line in the page
            logger.exception("search failed")
            return "", _error_html(f"internal error ({type(err).__name__}: {err}); the server log has the details")

    def speech_to_images(self, audio_path, top_k, rerank, rerank_k, explain=False):
        return self._guarded(self._speech_to_images, audio_path, top_k, rerank, rerank_k, explain)

    def _speech_to_images(self, audio_path, top_k, rerank, rerank_k, explain=False):
        if not audio_path:
            raise InferenceError("no query yet: record from the microphone or upload an audio file first")
        top_k, k = self._options(top_k, rerank, rerank_k)
        name = os.path.basename(audio_path)
        answer = self.service.search_images(
            audio_path, top_k=top_k, rerank_k=k, rerank_score=self.rerank_score, name=name
        )
        explained = 0
        if explain:
            self.service.explain_hits(answer, EXPLAIN_TOP)
            answer.timings["total"] += answer.timings["explain"]
            explained = min(EXPLAIN_TOP, len(answer.hits))
        query = PageQuery(
            name=name,
            waveform=answer.query_wave.numpy(),
            sample_rate=self.service.encoder.sample_rate,
            results=_cards(answer),
        )
        heading = (
            f"Images for the spoken query ({answer.query_wave.numel() / self.service.encoder.sample_rate:.1f} s, "
            "as the model heard it: 16 kHz mono)"
        )
        return (
            timing_text(answer.timings, answer.rerank, answer.method, explained),
            _results_html(query_section(query, 1, heading=heading), answer, "speech-to-image"),
        )

    def image_to_speech(self, image_path, top_k, rerank, rerank_k):
        return self._guarded(self._image_to_speech, image_path, top_k, rerank, rerank_k)

    def _image_to_speech(self, image_path, top_k, rerank, rerank_k):
        if not image_path:
            raise InferenceError("no query yet: upload an image first")
        top_k, k = self._options(top_k, rerank, rerank_k)
        answer = self.service.search_clips(image_path, top_k=top_k, rerank_k=k, rerank_score=self.rerank_score)
        enc = self.service.encoder
        waves = []
        for h in answer.hits:
            try:
                waves.append(enc.load_audio(h.absolute_path).numpy())
            except InferenceError:
                waves.append(None)  # shown as "cannot read"
        query = PageQuery(name=os.path.basename(image_path), results=_cards(answer, waves, enc.sample_rate))
        section = query_section(query, 1, heading="Spoken clips that describe the image")
        return timing_text(answer.timings, answer.rerank, answer.method), _results_html(
            section, answer, "image-to-speech"
        )

    # ---------------------------------------------------------------- layout

    def _controls(self, suffix):
        with gr.Row():
            top_k = gr.Number(
                value=self.top_k, precision=0, minimum=1, maximum=1000, label="Results", elem_id=f"top-k-{suffix}"
            )
            rerank = gr.Checkbox(
                value=self.rerank_on,
                label="Re-rank with the matching head",
                visible=self.service.has_matching_head,
                elem_id=f"rerank-{suffix}",
            )
            rerank_k = gr.Number(
                value=self.rerank_k,
                precision=0,
                minimum=1,
                maximum=1000,
                label=f"K (top K re-scored, {self.rerank_score})",
                visible=self.service.has_matching_head,
                elem_id=f"rerank-k-{suffix}",
            )
        return top_k, rerank, rerank_k

    def blocks(self) -> gr.Blocks:
        service = self.service
        head = (
            "a matching head: results can be re-ranked"
            if service.has_matching_head
            else "no matching head (re-ranking needs a coarse-to-fine checkpoint)"
        )
        indexes = [
            f"{len(i)} {i.what} ({i.source})" for i in (service.image_index, service.audio_index) if i is not None
        ]
        with gr.Blocks(title="Spoken search", analytics_enabled=False) as demo:
            gr.Markdown(f"## Spoken search\nCheckpoint `{self.checkpoint}` ({head}); {' and '.join(indexes)}.")
            if service.image_index is not None:
                with gr.Tab("Speech \u2192 images", elem_id="tab-speech"):
                    audio = gr.Audio(
                        sources=["microphone", "upload"],
                        type="filepath",
                        format=None,
                        label="Spoken query: record or upload (wav, flac, ogg, mp3)",
                        elem_id="query-audio",
                    )
                    top_k, rerank, rerank_k = self._controls("speech")
                    explain = gr.Checkbox(
                        value=False,
                        label=f"Show where the query lands on the top {EXPLAIN_TOP} images, and which part of it "
                        "drove the match (each card names its map)",
                        elem_id="explain-speech",
                    )
                    button = gr.Button("Search", variant="primary", elem_id="search-speech")
                    timing = gr.Markdown(elem_id="timing-speech", elem_classes=["cmd-timing"])
                    results = gr.HTML(elem_id="results-speech")
                    button.click(
                        self.speech_to_images,
                        [audio, top_k, rerank, rerank_k, explain],
                        [timing, results],
                        api_name="speech_to_images",
                        concurrency_limit=self.concurrency,
                        concurrency_id="model",
                    )
            if service.audio_index is not None:
                with gr.Tab("Image \u2192 speech", elem_id="tab-image"):
                    image = gr.Image(
                        sources=["upload"],
                        type="filepath",
                        image_mode=None,
                        label="Image query",
                        elem_id="query-image",
                        height=256,
                    )
                    top_k, rerank, rerank_k = self._controls("image")
                    button = gr.Button("Find clips", variant="primary", elem_id="search-image")
                    timing = gr.Markdown(elem_id="timing-image", elem_classes=["cmd-timing"])
                    results = gr.HTML(elem_id="results-image")
                    button.click(
                        self.image_to_speech,
                        [image, top_k, rerank, rerank_k],
                        [timing, results],
                        api_name="image_to_speech",
                        concurrency_limit=self.concurrency,
                        concurrency_id="model",
                    )
        return demo


def serve(
    service,
    host="127.0.0.1",
    port=7860,
    concurrency=4,
    top_k=10,
    rerank_k=0,
    rerank_score=None,
    max_upload_mb=50.0,
    checkpoint="",
    block=True,
):
    """Build and launch the app. ``block=True`` serves until interrupted; otherwise returns
    (blocks, url) with the server running in a background thread (``blocks.close()`` stops it)."""
    for name in ("httpx", "matplotlib"):  # gradio's own start-up requests (to this server) and font cache
        logging.getLogger(name).setLevel(logging.WARNING)
    app = App(
        service,
        top_k=top_k,
        rerank_k=rerank_k,
        rerank_score=rerank_score,
        checkpoint=checkpoint,
        concurrency=concurrency,
    )
    demo = app.blocks()
    demo.queue(default_concurrency_limit=concurrency)
    started = time.perf_counter()
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        max_file_size=f"{max_upload_mb:g}mb",
        ssr_mode=False,
        mcp_server=False,
        theme=gr.themes.Default(font=FONTS, font_mono=MONO),
        css=APP_CSS,
        footer_links=[],
    )
    logger.info(
        f"serving on {url} ({concurrency} searches at once; started in {time.perf_counter() - started:.1f} s); "
        "Ctrl-C stops it"
    )
    print(f"search app: {url}", flush=True)
    if not block:
        return demo, url
    try:
        demo.block_thread()
    finally:
        demo.close()
    return demo, url
