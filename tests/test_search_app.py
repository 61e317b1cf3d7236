"""The web app (examples/search.py serve) in a real browser: headless Debian Chromium driven by
selenium + chromium-driver records a spoken caption from Chromium's fake microphone, uploads clips
and images, and reads the gallery back from the page; Gradio's own client checks bad input,
concurrent clients and that the server keeps serving. The server is started and stopped here, on
a free loopback port.

Environment A only (scripts/install.sh installs gradio, selenium, chromium and chromium-driver;
there a missing browser fails the tests). Environment B has no gradio: the module is skipped.
"""

import hashlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

# nothing leaves this machine: gradio_client sends telemetry unless told not to (Client(analytics_enabled=False)
# below; the app turns gradio's off for the server)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
gradio = pytest.importorskip("gradio", reason="the web app needs gradio (pip install -e '.[app]')")
selenium = pytest.importorskip("selenium", reason="the browser tests need selenium (pip install selenium)")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_search import REPO  # noqa: E402
from test_search_service import (  # noqa: E402
    _error,
    env,  # noqa: E402,F401  (the module's checkpoint, images, clips and indexes)
    speak,
)

from cmd_plugin.search.index import load_index  # noqa: E402

MAX_QUERY_SECONDS = 8


def _fingerprint(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        return st.st_mtime_ns, st.st_size, hashlib.sha256(f.read()).hexdigest()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "Debian's chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver "
            "(scripts/install.sh does)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):  # noqa: F811
    """`search.py serve` with both indexes, on a free loopback port; stopped (Ctrl-C) at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    indexes_before = {p: _fingerprint(p) for p in (env["image_index"], env["audio_index"])}
    cmd = [
        sys.executable,
        os.path.join(REPO, "examples", "search.py"),
        "serve",
        "--checkpoint",
        env["checkpoint"],
        "--index",
        env["image_index"],
        "--index",
        env["audio_index"],
        "--port",
        str(port),
        "--max-query-seconds",
        str(MAX_QUERY_SECONDS),
        "--concurrency",
        "4",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(tmp_path_factory.getbasetemp()),
            env=dict(os.environ, PYTHONPATH=REPO),
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    try:
        while True:  # bounded: 120 s of polls to this machine's own port
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not answer within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "port": port, "log": log, "proc": proc, "indexes_before": indexes_before}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def spoken_query(env, tmp_path_factory):  # noqa: F811
    """The fake microphone's input: a spoken caption, 16-bit PCM wav (what Chromium's fake capture reads)."""
    return speak("two red circles on the left", tmp_path_factory.mktemp("mic") / "caption.wav")


@pytest.fixture(scope="module")
def browser(spoken_query, tmp_path_factory):
    chromium, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1300,1700",
        "--mute-audio",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={spoken_query}%noloop",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """Screenshots go here, and also to $CMD_SEARCH_APP_SCREENSHOTS when set (to look at them)."""
    return tmp_path_factory.mktemp("screenshots")


def _save_screenshot(driver, folder, name):
    path = folder / name
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(path))
    with Image.open(path) as im:
        colours = im.convert("RGB").resize((130, 170)).getcolors(maxcolors=100000)
    assert colours is not None and len(colours) > 200, "a blank page"  # thumbnails drawn
    if os.environ.get("CMD_SEARCH_APP_SCREENSHOTS"):
        os.makedirs(os.environ["CMD_SEARCH_APP_SCREENSHOTS"], exist_ok=True)
        shutil.copy(path, os.environ["CMD_SEARCH_APP_SCREENSHOTS"])
    return path


_CARDS = """
var box = document.querySelector(arguments[0]);
return Array.prototype.map.call(box.querySelectorAll('figure.result'), function (f) {
  var img = f.querySelector('img'), audio = f.querySelector('audio');
  return {rank: +f.dataset.rank, path: f.dataset.path, caption: f.querySelector('figcaption').textContent,
          width: img ? img.naturalWidth : null, complete: img ? img.complete : null,
          audio: audio ? {ready: audio.readyState, duration: audio.duration, error: audio.error && audio.error.code}
                       : null};
});
"""


def _wait(driver, css, timeout=60):
    return WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))[0]


def _results(driver, box):
    """Wait for an answer (or a message) in ``box`` -> (seconds from now, "ok" or the message)."""
    started = time.perf_counter()
    el = _wait(driver, f"{box} .cmd-results, {box} .cmd-error")
    seconds = time.perf_counter() - started
    if "cmd-error" in el.get_attribute("class"):
        return seconds, el.text
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "return Array.prototype.every.call(document.querySelectorAll(arguments[0] + ' img'), "
            "function (i) { return i.complete; })",
            box,
        )
    )
    return seconds, "ok"


def _upload(driver, component, path):
    driver.find_element(By.CSS_SELECTOR, f"{component} input[type=file]").send_keys(str(path))


def test_microphone_query_shows_ranked_decoded_images_and_reranks_in_chromium(server, browser, screenshots):
    d = browser
    d.get(server["url"])
    _wait(d, "#query-audio button.record-button").click()
    time.sleep(2.8)  # the caption lasts ~2 s; the fake microphone plays it once
    d.find_element(By.CSS_SELECTOR, "#query-audio button.stop-button").click()
    _wait(d, "#query-audio button[aria-label='Play']")  # recorded and uploaded
    d.find_element(By.CSS_SELECTOR, "#rerank-speech input[type=checkbox]").click()
    k_box = d.find_element(By.CSS_SELECTOR, "#rerank-k-speech input")
    assert k_box.get_attribute("value") == "12"  # the checkpoint's task.valid_rerank_k
    k_box.clear()
    k_box.send_keys("5\t")
    d.find_element(By.CSS_SELECTOR, "#search-speech").click()
    seconds, status = _results(d, "#results-speech")
    assert status == "ok", status
    cards = d.execute_script(_CARDS, "#results-speech")
    assert [c["rank"] for c in cards] == list(range(1, 10))  # 9 images, 10 asked for
    assert all(c["complete"] and c["width"] > 0 for c in cards), cards  # every thumbnail decoded
    for c in cards:  # rank and score: the re-ranked five first
        label = "re-ranked" if c["rank"] <= 5 else "cosine"
        assert re.match(rf"#{c['rank']} \u00b7 {label} -?\d+\.\d{{3}}", c["caption"]), c["caption"]
    assert len({c["path"] for c in cards}) == 9
    timing = d.find_element(By.CSS_SELECTOR, "#timing-speech").text
    for step in ("decoding", "embedding", "search", "re-ranking top 5 (sim+sic)", "total"):
        assert step in timing, timing
    # the query as the model heard it: the recorded caption, not silence
    heard = d.execute_script(
        "var a = document.querySelector('#results-speech audio.query-audio');return a.readyState >= 1 ? a.duration : -1"
    )
    assert heard > 1.0, heard
    shot = _save_screenshot(d, screenshots, "app_microphone_reranked.png")
    print(f"\nmicrophone query: submit to gallery {1000 * seconds:.0f} ms ({timing}); screenshot {shot}")


_EXPLAINED = """
var box = document.querySelector(arguments[0]);
return Array.prototype.map.call(box.querySelectorAll('figure.result .explain'), function (e) {
  var map = e.querySelector('img.explain-map'), strip = e.querySelector('img.explain-saliency');
  return {kind: e.dataset.kind, rank: +e.closest('figure').dataset.rank,
          map: [map.complete, map.naturalWidth, map.naturalHeight],
          strip: strip ? [strip.complete, strip.naturalWidth, strip.naturalHeight] : null};
});
"""


def test_a_ticked_box_shows_where_the_query_lands_on_the_top_results_in_chromium(env, server, browser, screenshots):  # noqa: F811
    d = browser
    d.get(server["url"])
    _wait(d, "#query-audio button[aria-label='Upload file']").click()
    _upload(d, "#query-audio", env["clips"] / "more" / "caption1.wav")
    _wait(d, "#query-audio button[aria-label='Play']")
    box = d.find_element(By.CSS_SELECTOR, "#explain-speech input[type=checkbox]")
    assert "each card names its map" in d.find_element(By.CSS_SELECTOR, "#explain-speech").text
    box.click()
    d.find_element(By.CSS_SELECTOR, "#search-speech").click()
    _, status = _results(d, "#results-speech")
    assert status == "ok", status
    explained = d.execute_script(_EXPLAINED, "#results-speech")
    # the top 3 cards, each with a decoded heatmap over its image and a decoded saliency strip
    assert [e["rank"] for e in explained] == [1, 2, 3], explained
    for e in explained:
        assert e["kind"] == "dense_similarity"
        assert e["map"][0] and e["map"][1] > 0 and e["map"][2] > 0, e
        assert e["strip"] and e["strip"][0] and e["strip"][1] == 180 and e["strip"][2] == 36, e
    timing = d.find_element(By.CSS_SELECTOR, "#timing-speech").text
    assert "explaining top 3" in timing, timing
    shot = _save_screenshot(d, screenshots, "app_explained.png")
    print(f"\nexplained query: {timing}; screenshot {shot}")


def test_uploads_a_clip_and_an_image_and_explains_bad_input_in_the_page(env, server, browser, screenshots, tmp_path):  # noqa: F811
    from cmd_plugin.search.service import SearchService

    service = SearchService(
        env["encoder"], image_index=load_index(env["image_index"]), audio_index=load_index(env["audio_index"])
    )
    d = browser
    d.get(server["url"])
    _wait(d, "#query-audio button[aria-label='Upload file']").click()
    # silence first: a message in the page
    silent = tmp_path / "silence.wav"
    sf.write(str(silent), np.zeros(24000, np.float32), 16000)
    _upload(d, "#query-audio", silent)
    _wait(d, "#query-audio button[aria-label='Play']")
    d.find_element(By.CSS_SELECTOR, "#search-speech").click()
    _, status = _results(d, "#results-speech")
    assert "the clip is silent" in status and "silence.wav" in status, status
    # then a spoken clip: the same answer as the service gives in this process
    d.find_element(By.CSS_SELECTOR, "#query-audio button[aria-label='Clear']").click()
    clip = env["clips"] / "more" / "caption1.wav"
    _wait(d, "#query-audio input[type=file]")
    _upload(d, "#query-audio", clip)
    _wait(d, "#query-audio button[aria-label='Play']")
    started = time.perf_counter()
    d.find_element(By.CSS_SELECTOR, "#search-speech").click()
    WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results-speech .cmd-results"))
    _, status = _results(d, "#results-speech")
    seconds = time.perf_counter() - started
    assert status == "ok", status
    cards = d.execute_script(_CARDS, "#results-speech")
    expected = service.search_images(str(clip), top_k=10)
    assert [c["path"] for c in cards] == [h.path for h in expected.hits]
    assert all(c["width"] > 0 for c in cards)
    for c, h in zip(cards, expected.hits):
        assert f"cosine {h.score:.3f}" in c["caption"]
    _save_screenshot(d, screenshots, "app_upload.png")

    # image -> speech: the ranked clips, each with a player that loaded
    tab = next(b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Image" in b.text)
    tab.click()
    image = env["photos"] / "img0.png"
    _wait(d, "#query-image input[type=file]")
    _upload(d, "#query-image", image)
    _wait(d, "#query-image img")
    d.find_element(By.CSS_SELECTOR, "#search-image").click()
    _, status = _results(d, "#results-image")
    assert status == "ok", status
    WebDriverWait(d, 30).until(
        lambda d: all(c["audio"]["ready"] >= 1 for c in d.execute_script(_CARDS, "#results-image"))
    )
    cards = d.execute_script(_CARDS, "#results-image")
    expected = service.search_clips(str(image), top_k=10)
    assert [c["path"] for c in cards] == [h.path for h in expected.hits] and len(cards) == 4
    for c in cards:
        assert c["audio"]["error"] is None and c["audio"]["duration"] > 1.0, c
    shot = _save_screenshot(d, screenshots, "app_image_to_speech.png")
    print(f"\nupload query: submit to gallery {1000 * seconds:.0f} ms; screenshots in {shot.parent}")


def _ask(client, path, top_k=10, rerank=False, k=12):
    timing, page = client.predict(handle_file(str(path)), top_k, rerank, k, False, api_name="/speech_to_images")
    return timing, page


def test_bad_input_is_answered_with_a_message_and_the_server_keeps_serving(env, server, tmp_path):  # noqa: F811
    client = Client(server["url"], verbose=False, analytics_enabled=False)
    rng = np.random.default_rng(0)
    silent, short, long, text = (tmp_path / n for n in ("silent.wav", "short.wav", "long.flac", "notes.mp3"))
    sf.write(str(silent), np.zeros(16000, np.float32), 16000)
    sf.write(str(short), 0.3 * np.ones(800, np.float32), 16000)
    sf.write(str(long), (0.1 * rng.standard_normal(16000 * (MAX_QUERY_SECONDS + 2))).astype(np.float32), 16000)
    text.write_text("not audio")
    cases = {
        silent: "the clip is silent",
        short: "shorter than the model's minimum 0.100 s",
        long: f"longer than this server's limit of {MAX_QUERY_SECONDS} s per query (--max-query-seconds)",
        text: "cannot read audio (expected a file libsndfile reads",
        env["photos"] / "img0.png": "cannot read audio: this is a PNG image, not a sound file",
    }
    for path, message in cases.items():
        timing, page = _ask(client, path)
        assert 'class="cmd-error"' in page and f"{path.name}: " in page, (path, page)  # the file named
        assert message in html.unescape(page), (path, page)
        assert timing == "" and "Traceback" not in page
    with pytest.raises(AppError, match="Value 0 is less than minimum value 1"):  # gradio's own check of the field
        client.predict(
            handle_file(str(env["clips"] / "caption0.wav")), 0, False, 12, False, api_name="/speech_to_images"
        )
    with pytest.raises(AppError, match="cannot identify image file"):  # gradio's image box opens it first
        client.predict(handle_file(str(env["clips"] / "caption0.wav")), 10, False, 12, api_name="/image_to_speech")
    # still serving
    timing, page = _ask(client, env["clips"] / "caption0.wav", top_k=3)
    assert page.count('class="result"') == 3 and "total" in timing
    assert server["proc"].poll() is None
    assert "search failed" not in server["log"].read_text()  # no search ended in an internal error


def test_concurrent_clients_get_their_own_answers(env, server):  # noqa: F811
    clips = sorted(env["clips"].rglob("*.wav"))
    clients = [Client(server["url"], verbose=False, analytics_enabled=False) for _ in clips]
    alone = {c: _ask(clients[0], c, rerank=True, k=5)[1] for c in clips}

    def paths(page):
        return [p.split('"')[0] for p in page.split('data-path="')[1:]]

    failures, times = [], []

    def worker(client, clip):
        for _ in range(3):
            started = time.perf_counter()
            _, page = _ask(client, clip, rerank=True, k=5)
            times.append(time.perf_counter() - started)
            if paths(page) != paths(alone[clip]):
                failures.append(str(clip))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(client, clip)) for client, clip in zip(clients, clips)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - started
    assert not failures, failures
    assert len(times) == 3 * len(clips) and all(len(paths(alone[c])) == 9 for c in clips)
    print(f"\n{len(clips)} concurrent clients: {len(times) / wall:.1f} requests/s")


def test_the_server_never_wrote_into_the_indexes(env, server):  # noqa: F811
    """After every search above (run first: tests run in file order)."""
    for path, before in server["indexes_before"].items():
        assert _fingerprint(path) == before, path
    assert sorted(os.listdir(os.path.dirname(env["image_index"]))) == sorted(
        ["c2f", "cmd", "photos", "clips", "photos.pt", "clips.pt"]
    )


def test_serve_refuses_indexes_of_another_model_before_listening(env, tiny_encoders, tmp_path, capsys):  # noqa: F811
    from test_search import make_checkpoint

    from cmd_demo.tiny_encoders import make_tiny_clip

    # another image encoder (other CLIP weights): the image index is refused
    _, _, weights = make_tiny_clip(str(tmp_path / "other_clip"), seed=1)
    other, _ = make_checkpoint(
        str(tmp_path / "other" / "checkpoint_best.pt"), dict(tiny_encoders, image_pretrained=weights), seed=1
    )
    err = _error(capsys, "serve", "--checkpoint", other, "--index", env["image_index"], "--port", str(_free_port()))
    assert "was built with another image encoder than this checkpoint's" in err
    assert "image encoder weights (image_weights_sha256)" in err
    # another speech side: the clips' index is refused
    err = _error(
        capsys, "serve", "--checkpoint", env["plain"], "--index", env["audio_index"], "--port", str(_free_port())
    )
    assert "was built with another speech encoder than this checkpoint's" in err
    err = _error(
        capsys,
        "serve",
        "--checkpoint",
        env["checkpoint"],
        "--index",
        env["image_index"],
        "--index",
        env["image_index"],
        "--port",
        str(_free_port()),
    )
    assert "are both indexes of images: give at most one of each kind" in err
    err = _error(capsys, "serve", "--checkpoint", env["checkpoint"], "--index", env["image_index"], "--port", "0")
    assert "--port in 1..65535" in err


def test_import_cmd_plugin_does_not_import_gradio():
    code = (
        "import sys, cmd_plugin, cmd_plugin.search.service, cmd_plugin.search.page, cmd_plugin.inference; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('gradio', 'selenium'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=REPO),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
