#!/usr/bin/env python
"""The web app's speed (examples/search.py serve): per-step times and requests per second.

    python benchmarks/bench_search_app.py --checkpoint CK --index IMAGES.pt [--audio-index CLIPS.pt] \\
        --clips DIR [--num-queries 20] [--rerank-k 32] [--browser] [--out results.json]

1. In process (cmd_plugin.search.service, what the app calls): the median time of each step of a
   query -- decoding, embedding, search, re-ranking -- over --num-queries spoken clips from DIR
   (speech -> images) and as many indexed images (image -> speech, with --audio-index), without and
   with re-ranking the top K; the best of --repeats passes (lowest median total: the machine may be
   shared). The first query of each pass is a warm-up and left out.
2. Through the server (`search.py serve`, started here on a free loopback port, stopped after):
   one client's round trip (submit to answer), then 4 clients at once, each sending its own clips
   one after the other (gradio_client), for --concurrency 1 and 4 (torch threads: serve's default,
   CPUs / concurrency): requests per second.
3. With --browser, in headless Chromium (selenium + chromium-driver): upload a clip, press Search,
   wait until every thumbnail of the gallery has decoded: the time from the click, median.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # with Client(analytics_enabled=False): no telemetry leaves
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from cmd_plugin.files import atomic_write_json  # noqa: E402


def median_ms(values):
    return round(1000 * statistics.median(values), 2)


def in_process(args, clips, images):
    import torch

    from cmd_plugin.inference import SpeechImageEncoder

    torch.set_num_threads(args.torch_threads)
    from cmd_plugin.search.index import load_index
    from cmd_plugin.search.service import SearchService

    t = time.perf_counter()
    encoder = SpeechImageEncoder.from_checkpoint(args.checkpoint, keep_matching=True)  # re-ranking is timed
    service = SearchService(
        encoder,
        image_index=load_index(args.index),
        audio_index=load_index(args.audio_index) if args.audio_index else None,
    )
    out = {
        "load_seconds": round(time.perf_counter() - t, 2),
        "rerank_k": args.rerank_k,
        "num_images": len(service.image_index),
        "has_matching_head": service.has_matching_head,
    }
    runs = [("speech_to_images", service.search_images, clips)]
    if service.audio_index is not None:
        out["num_clips"] = len(service.audio_index)
        runs.append(("image_to_speech", service.search_clips, images))
    for name, fn, queries in runs:
        for k in [0, args.rerank_k] if service.has_matching_head else [0]:
            passes = []
            for _ in range(args.repeats):  # the machine is shared: the pass with the lowest median total counts
                steps = {}
                for i, q in enumerate(queries[: args.num_queries + 1]):
                    answer = fn(q, top_k=10, rerank_k=k)
                    if i == 0:
                        continue  # warm-up
                    for step, seconds in answer.timings.items():
                        steps.setdefault(step, []).append(seconds)
                passes.append({f"{step}_ms": median_ms(v) for step, v in steps.items()})
            key = f"{name}{'_rerank' if k else ''}"
            out[key] = min(passes, key=lambda p: p["total_ms"])
            out[key]["total_ms_of_each_pass"] = [p["total_ms"] for p in passes]
            print(
                f"{key}: " + ", ".join(f"{s} {v} ms" for s, v in ((s[:-3], v) for s, v in out[key].items())), flush=True
            )
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, concurrency):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [
            sys.executable,
            os.path.join(REPO, "examples", "search.py"),
            "serve",
            "--checkpoint",
            args.checkpoint,
            "--index",
            args.index,
            "--port",
            str(self.port),
            "--concurrency",
            str(concurrency),
        ]
        if args.audio_index:
            cmd += ["--index", args.audio_index]
        self.log = open(os.path.join(args.work_dir, f"serve_c{concurrency}.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:  # bounded polls of this machine's own port
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit(f"no answer from {self.url} in 180 s")
                time.sleep(0.5)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _ask(client, clip, rerank_k):
    from gradio_client import handle_file

    timing, page = client.predict(handle_file(clip), 10, bool(rerank_k), rerank_k or 12, api_name="/speech_to_images")
    if "cmd-results" not in page:
        raise SystemExit(f"{clip}: no results: {page[:300]}")
    return page


def through_server(args, clips):
    from gradio_client import Client

    out = {}
    for concurrency in (1, 4):
        server = Server(args, concurrency)
        try:
            for k in (0, args.rerank_k):
                clients = [Client(server.url, verbose=False, analytics_enabled=False) for _ in range(4)]
                for c in clients:
                    _ask(c, clips[0], k)  # warm-up
                single = []
                for clip in clips[1 : args.num_queries + 1]:
                    t = time.perf_counter()
                    _ask(clients[0], clip, k)
                    single.append(time.perf_counter() - t)
                per_client = args.num_queries // 4 or 1
                latencies = []

                def work(client, mine):
                    for clip in mine:
                        t = time.perf_counter()
                        _ask(client, clip, k)
                        latencies.append(time.perf_counter() - t)

                threads = [
                    threading.Thread(target=work, args=(c, clips[1 + i * per_client : 1 + (i + 1) * per_client]))
                    for i, c in enumerate(clients)
                ]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                wall = time.perf_counter() - t
                key = f"concurrency{concurrency}{'_rerank' if k else ''}"
                out[key] = {
                    "one_client_round_trip_ms": median_ms(single),
                    "requests": len(latencies),
                    "four_clients_requests_per_second": round(len(latencies) / wall, 2),
                    "four_clients_round_trip_ms": median_ms(latencies),
                }
                print(f"{key}: {out[key]}", flush=True)
            if args.browser and concurrency == 4:
                out["browser_submit_to_gallery_ms"] = browser(args, server.url, clips)
        finally:
            server.stop()
    return out


def browser(args, url, clips):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1700", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    times = {}
    try:
        for k in (0, args.rerank_k):
            values = []
            for clip in clips[1:6]:
                driver.get(url)
                wait = WebDriverWait(driver, 60)
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query-audio button[aria-label='Upload file']"))[
                    0
                ].click()
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query-audio input[type=file]"))[0].send_keys(
                    clip
                )
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query-audio button[aria-label='Play']"))
                if k:
                    driver.find_element(By.CSS_SELECTOR, "#rerank-speech input[type=checkbox]").click()
                    box = driver.find_element(By.CSS_SELECTOR, "#rerank-k-speech input")
                    box.clear()
                    box.send_keys(f"{k}\t")
                t = time.perf_counter()
                driver.find_element(By.CSS_SELECTOR, "#search-speech").click()
                wait.until(
                    lambda d: d.execute_script(
                        "var imgs = document.querySelectorAll('#results-speech .cmd-results img');"
                        "return imgs.length > 0 && Array.prototype.every.call(imgs, function (i) {"
                        "  return i.complete && i.naturalWidth > 0; })"
                    )
                )
                values.append(time.perf_counter() - t)
            times["rerank" if k else "plain"] = median_ms(values)
            print(
                f"browser submit to gallery ({'re-ranked' if k else 'plain'}): {times['rerank' if k else 'plain']} ms",
                flush=True,
            )
    finally:
        driver.quit()
    return times


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--index", required=True, help="index of images")
    p.add_argument("--audio-index", help="index of spoken clips (image -> speech)")
    p.add_argument("--clips", required=True, help="folder of spoken queries (wav)")
    p.add_argument("--num-queries", type=int, default=20)
    p.add_argument("--rerank-k", type=int, default=32)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the in-process part (default: 1)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the queries in process (best median counts)")
    p.add_argument("--browser", action="store_true")
    p.add_argument("--skip-server", action="store_true")
    p.add_argument("--work-dir", default="/tmp/bench_search_app")
    p.add_argument("--out", help="write the figures here (JSON)")
    args = p.parse_args()
    import logging

    for name in ("httpx", "httpcore", "PIL", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.makedirs(args.work_dir, exist_ok=True)
    clips = sorted(os.path.join(args.clips, f) for f in os.listdir(args.clips) if f.endswith(".wav"))
    step = max(1, len(clips) // (args.num_queries + 1))
    clips = clips[::step][: args.num_queries + 1]  # spread over the folder (other images, other speakers)
    from cmd_plugin.search.index import load_index

    index = load_index(args.index)
    images = [index.absolute_path(r) for r in range(0, len(index), max(1, len(index) // (args.num_queries + 1)))]

    record = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads_in_process": args.torch_threads,
            "server_torch_threads": "CPUs / --concurrency (serve's default)",
            "load_average": os.getloadavg(),
        },
        "checkpoint": os.path.abspath(args.checkpoint),
        "num_queries": args.num_queries,
    }
    record["in_process"] = in_process(args, clips, images)
    if not args.skip_server:
        record["server"] = through_server(args, clips)
    record["machine"]["load_average_after"] = os.getloadavg()
    if args.out:
        atomic_write_json(args.out, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
