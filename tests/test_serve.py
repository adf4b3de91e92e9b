"""`affinage serve`: a real browser uploads a photo and reads the label; 50 concurrent API calls agree with
`affinage predict`; bad uploads get a readable message; local only, no share link, nothing sent outside."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_oxford17

from affinage.cli import build_parser, main
from affinage.predict import held_out_photos
from affinage.run import Run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
requires_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser at /usr/bin/chromium "
                                       "(apt-get install -y chromium); the Playwright test drives that one")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, **options):
    from affinage.serve import build_app, launch_options

    max_upload_mb = options.pop("max_upload_mb", 20.0)
    app = build_app(run_dir, max_upload_mb=max_upload_mb, **options)
    app.launch(prevent_thread_lock=True, quiet=True, **launch_options("127.0.0.1", free_port(), max_upload_mb))
    return app


def stop(app) -> None:
    app.close()
    app._affinage_model.close()


@pytest.fixture(scope="module")
def served(oxford17_probe):
    app = launch(oxford17_probe)
    yield app
    stop(app)


@pytest.fixture
def no_internet(monkeypatch):
    """Refuse (and record) every outgoing connection that is not to this machine."""
    attempts: list[object] = []
    connect = socket.socket.connect

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def predict_cli(run_dir: Path, photos: list[str], capsys) -> list[dict]:
    assert main(["predict", str(run_dir), *photos, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------------------------
# Must-show: a browser, and 50 concurrent API calls, on a real EfficientNet-Lite0 Oxford-17 run
# ----------------------------------------------------------------------------------------------
@requires_oxford17
@requires_chromium
@pytest.mark.slow
def test_browser_upload_shows_the_predicted_label(served, oxford17_probe, capsys, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (affinage[dev])")
    photo = held_out_photos(Run.load(oxford17_probe))[5]
    expected = predict_cli(oxford17_probe, [photo], capsys)[0]
    fake = tmp_path / "holiday.jpg"
    fake.write_text("<html>a web page saved as .jpg</html>")
    outside: list[str] = []

    def only_local(route):
        if route.request.url.startswith(served.local_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(served.local_url, wait_until="networkidle")
            facts = page.locator("body").inner_text()
            assert "efficientnet_lite0" in facts and "linear-probe" in facts and "test accuracy" in facts
            page.locator("#photo input[type=file]").set_input_files(photo)
            heading = page.locator("#prediction h2.output-class")
            heading.wait_for(timeout=60_000)
            label = heading.inner_text().strip()
            meter = page.locator(f'#prediction meter[aria-label="{label}"]')
            probability = float(meter.get_attribute("value"))
            shown = page.locator("#prediction dd.confidence").first.inner_text()
            # a file that is not a photo: a readable message in the page, not a stack trace
            page.locator("#photo input[type=file]").set_input_files(str(fake))
            toast = page.locator(".toast-body").first
            toast.wait_for(timeout=60_000)
            message = toast.inner_text()
        finally:
            browser.close()
    print(f"\npage: {Path(photo).name} -> {label} {probability:.4f} ({shown}); "
          f"affinage predict: {expected['label']} {expected['probability']:.4f}")
    assert label == expected["label"]
    assert probability == pytest.approx(expected["probability"], abs=0.01)
    assert shown == f"{round(probability * 100)}%"
    assert "holiday.jpg cannot be used: not an image" in message
    assert outside == []  # no fonts, analytics or anything else fetched from outside


@requires_oxford17
@pytest.mark.slow
def test_50_concurrent_api_calls_agree_with_predict(served, oxford17_probe, capsys, no_internet):
    from gradio_client import Client, handle_file

    photos = held_out_photos(Run.load(oxford17_probe), 50)
    assert len(photos) == 50 and len({Path(p).parent.name for p in photos}) == 17
    expected = predict_cli(oxford17_probe, photos, capsys)
    local = threading.local()

    def call(photo: str):
        if not hasattr(local, "client"):
            local.client = Client(served.local_url, verbose=False)
        try:
            return local.client.predict(handle_file(photo), api_name="/predict")
        except Exception as exc:  # counted below
            return exc

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, photos))
    seconds = time.perf_counter() - start
    errors = [a for a in answers if isinstance(a, Exception)]
    assert errors == []
    same = sum(a["label"] == e["label"] for a, e in zip(answers, expected))
    gap = max(abs(a["confidences"][0]["confidence"] - e["probability"]) for a, e in zip(answers, expected))
    print(f"\n50 calls / 16 threads: {len(errors)} errors, same top-1 as `affinage predict` on {same}/50, "
          f"max top-1 probability gap {gap:.2e}, {seconds:.1f}s")
    assert same == 50
    assert gap < 0.01
    assert no_internet == []  # the client reached nothing but this machine


# ----------------------------------------------------------------------------------------------
# Contract of the app: API name, binding, no share link, no analytics, uploads, examples
# ----------------------------------------------------------------------------------------------
def test_app_contract(tiny_run, no_internet):
    from gradio_client import Client

    from affinage.serve import DEFAULT_CONCURRENCY

    app = launch(tiny_run)
    try:
        assert app.server_name == "127.0.0.1" and not app.share
        assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
        api = Client(app.local_url, verbose=False).view_api(print_info=False, return_format="dict")
        assert list(api["named_endpoints"]) == ["/predict"]
        predict = next(fn for fn in app.fns.values() if fn.api_name == "predict")
        assert predict.concurrency_limit == DEFAULT_CONCURRENCY  # parallel users are not queued behind one another
        config = json.loads(urllib.request.urlopen(app.local_url + "config", timeout=30).read())
        assert config["analytics_enabled"] is False
    finally:
        stop(app)
    assert no_internet == []


def test_uploads_that_are_not_photos_or_too_large(tiny_run, tmp_path, no_internet):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    app = launch(tiny_run, max_upload_mb=0.05)
    try:
        client = Client(app.local_url, verbose=False)
        fake = tmp_path / "cat.png"
        fake.write_bytes(b"%PDF-1.4 a document, not a photo")
        with pytest.raises(AppError, match=r"cat.png cannot be used: not an image \(unrecognised file content\)"):
            client.predict(handle_file(str(fake)), api_name="/predict")
        big = tmp_path / "big.jpg"
        big.write_bytes(np.random.default_rng(0).bytes(80_000))
        with pytest.raises(Exception, match="exceeds the maximum file size"):
            client.predict(handle_file(str(big)), api_name="/predict")
        # the server enforces the limit itself too (a client may not check): same message as in the page
        predict = next(fn.fn for fn in app.fns.values() if fn.api_name == "predict")
        import gradio as gr

        with pytest.raises(gr.Error, match=r"big.jpg is 0.1 MB; this server accepts photos up to 0.05 MB"):
            predict({"path": str(big), "orig_name": "big.jpg"})
        assert predict(None) is None  # a cleared input clears the label
    finally:
        stop(app)


def test_examples_come_from_the_test_split(tiny_run):
    import csv

    with open(tiny_run / "splits" / "test.csv", newline="") as fh:
        test = [row["path"] for row in csv.DictReader(fh)]
    photos = held_out_photos(Run.load(tiny_run))
    assert sorted(photos) == sorted(test)
    first = [Path(p).parent.name for p in photos[:3]]
    assert sorted(first) == sorted(set(first))  # one per class before a second of any


def test_model_calls_from_many_threads_match_one_at_a_time(tiny_run):
    from affinage.data import load_pixels
    from affinage.serve import BatchingModel

    run = Run.load(tiny_run)
    photos = held_out_photos(run) * 4
    pixels = [load_pixels(Path(p).read_bytes(), run.preprocessing) for p in photos]
    model = BatchingModel(run, max_batch=8, max_wait_s=0.02, workers=2)  # two forward passes at once
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(model.probabilities, pixels))
        alone = [model.probabilities(x) for x in pixels]
    finally:
        model.close()
    assert not any(worker.is_alive() for worker in model._workers)  # close stops every worker
    assert [int(p.argmax()) for p in together] == [int(p.argmax()) for p in alone]
    assert np.abs(np.stack(together) - np.stack(alone)).max() < 0.02  # bf16 autocast on CPUs that have it


def test_stats_count_every_request_image_and_batch(tiny_run):
    from affinage.serve import BatchingModel, ServeStats, build_app

    run = Run.load(tiny_run)
    photos = held_out_photos(run) * 3
    app = build_app(run)
    predict = next(fn.fn for fn in app.fns.values() if fn.api_name == "predict")
    stats: ServeStats = app._affinage_model.stats
    try:
        assert stats.counters() == ServeStats().counters()  # the warm-up pass is not counted
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: predict({"path": p}), photos))
    finally:
        app._affinage_model.close()
    assert len(answers) == len(photos) and all(set(a) <= set(run.classes) for a in answers)
    counted = stats.counters()
    assert counted["requests"] == counted["images"] == len(photos)
    assert 1 <= counted["batches"] <= len(photos)
    assert counted["decode_s"] > 0 and counted["handler_s"] > counted["decode_s"]
    assert counted["image_model_s"] >= counted["model_s"] > 0  # every image of a batch waited for its whole pass

    model = BatchingModel(run, max_batch=4, max_wait_s=0.5)  # a long wait: batches fill to max_batch
    pixels = np.zeros((3, run.preprocessing.stored_size, run.preprocessing.stored_size), dtype=np.uint8)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: model.probabilities(pixels), range(12)))
    finally:
        model.close()
    assert model.stats.images == 12 and 3 <= model.stats.batches <= 12
    model.stats.reset()
    assert model.stats.counters() == ServeStats().counters()


def test_model_threads_share_the_cores_between_workers(monkeypatch):
    import torch

    from affinage.serve import model_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert model_threads(workers=2) == max(1, cores // 2)
        assert model_threads(workers=cores * 4) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
        torch.set_num_threads(3)
        assert model_threads(workers=1) == 3
    finally:
        torch.set_num_threads(before)


def test_serve_command_listens_locally_until_interrupted(tiny_run, tmp_path):
    assert build_parser().parse_args(["serve", "run"]).host == "127.0.0.1"
    port = free_port()
    stats = tmp_path / "stats.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AFFINAGE_SERVE_STATS": str(stats)}
    proc = subprocess.Popen([sys.executable, "-m", "affinage.cli", "serve", str(tiny_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the server answers
        assert f"at http://127.0.0.1:{port}/" in line and "/predict" in line, (line, proc.stderr.read())
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "<html" in page.lower()
        proc.send_signal(signal.SIGUSR1)  # AFFINAGE_SERVE_STATS: the counters, on demand
        for _ in range(300):
            if stats.exists():
                break
            time.sleep(0.1)
        counters = json.loads(stats.read_text())
        assert counters["requests"] == counters["images"] == counters["batches"] == 0  # a page view is no request
        assert counters["torch_threads"] >= 1 and counters["cpu_s"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_bad_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a finished affinage run" in err


def test_serve_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--host", "--port", "--top-k", "--max-upload-mb", "--concurrency", "127.0.0.1", "no analytics"):
        assert option in out, option


def test_the_cli_default_concurrency_is_the_servers():
    from affinage.cli import build_parser
    from affinage.serve import DEFAULT_CONCURRENCY

    args = build_parser().parse_args(["serve", "some-run"])
    assert args.concurrency == DEFAULT_CONCURRENCY
