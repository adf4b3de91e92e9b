"""Serve a run: a local Gradio page (drop a photo, get the top-k labels) and a `/predict` API, through the same
decoding (`data.load_pixels`) and inference (`Run.logits`) code as training-time evaluation and `affinage predict`."""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import UnreadableImage, load_pixels
from .errors import AffinageError, missing_extra
from .predict import held_out_photos, top_labels

if TYPE_CHECKING:
    import gradio as gr

    from .saved import Run

DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0  # a phone photo is 2-8 MB; larger uploads are refused before decoding
DEFAULT_CONCURRENCY = 32  # requests in the handler at once (decoding or waiting for a batch): two full batches
DEFAULT_MODEL_WORKERS = 2  # forward passes at once (BatchingModel)
MAX_EXAMPLES = 20
STATS_ENV = "AFFINAGE_SERVE_STATS"  # a path: the server writes its ServeStats there on SIGUSR1 and at exit


@dataclass
class ServeStats:
    """Cumulative counters of where a server's time goes (seconds are summed, so take differences between two
    snapshots to measure a stretch): how much of a request is decoding, waiting for the model and the model."""

    requests: int = 0  # /predict calls that reached the decoder
    handler_s: float = 0.0  # summed over requests: inside the handler (read + decode + model wait + model + top-k)
    decode_s: float = 0.0  # summed over requests: load_pixels
    batches: int = 0  # forward passes of the model
    images: int = 0  # images through those passes
    model_s: float = 0.0  # summed over batches: the model worker busy in Run.probabilities
    model_thread_cpu_s: float = 0.0  # of which the worker thread's own CPU (intra-op threads not counted)
    image_model_s: float = 0.0  # summed over images: the forward pass of the batch each was in
    image_wait_s: float = 0.0  # summed over images: queued for the model until its batch started
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **seconds_and_counts: float) -> None:
        with self._lock:
            for name, value in seconds_and_counts.items():
                setattr(self, name, getattr(self, name) + value)

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.compare}

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                if f.compare:
                    setattr(self, f.name, f.default)

    def snapshot(self) -> dict[str, Any]:
        """The counters, the process's CPU seconds and torch's thread count, as a JSON-ready dict."""
        import torch

        return {**self.counters(), "cpu_s": time.process_time(), "torch_threads": torch.get_num_threads()}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write `snapshot()` atomically (a reader never sees half a file)."""
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.snapshot(), indent=2))
        os.replace(tmp, path)


def _import_gradio() -> Any:
    # Gradio reads these when a Blocks is made: no usage analytics, no version check, no Hub telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as exc:
        raise missing_extra("gradio", "serve") from exc
    return gr


class BatchingModel:
    """The run's model behind `workers` threads: concurrent requests are queued, batched together (up to
    `max_batch`, waiting at most `max_wait_s` for company) and answered through futures, so parallel users share a
    forward pass instead of waiting in line. Two workers: one batch runs while the next one forms, and on a small
    CPU two single-threaded forward passes side by side keep the cores busier than one two-threaded pass."""

    def __init__(self, run: Run, max_batch: int = 16, max_wait_s: float = 0.01, stats: ServeStats | None = None,
                 workers: int = DEFAULT_MODEL_WORKERS):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.stats = stats or ServeStats()
        self._requests: queue.Queue[tuple[np.ndarray, Future[np.ndarray], float] | None] = queue.Queue()
        self._workers = [threading.Thread(target=self._loop, name=f"affinage-model-{k}", daemon=True)
                         for k in range(workers)]
        for worker in self._workers:
            worker.start()
        # load the weights and warm up now: the first user does not pay for it
        side = run.preprocessing.stored_size
        self.probabilities(np.zeros((3, side, side), dtype=np.uint8))
        self.stats.reset()  # the warm-up is not a request

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for one decoded image (a `load_pixels` array)."""
        future: Future[np.ndarray] = Future()
        self._requests.put((pixels, future, time.perf_counter()))
        return future.result()

    def close(self) -> None:
        for _ in self._workers:
            self._requests.put(None)  # one stop per worker
        for worker in self._workers:
            worker.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._requests.put(None)  # this worker's or another's stop: take it after answering this batch
                    break
                batch.append(item)
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                probabilities = self.run.probabilities(np.stack([pixels for pixels, _, _ in batch]))
            except BaseException as exc:  # answer every waiting request, keep serving
                for _, future, _ in batch:
                    future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            self.stats.add(batches=1, images=len(batch), model_s=seconds, image_model_s=seconds * len(batch),
                           model_thread_cpu_s=time.thread_time() - cpu,
                           image_wait_s=sum(start - queued for _, _, queued in batch))
            for (_, future, _), row in zip(batch, probabilities):
                future.set_result(row)


def model_facts(run: Run) -> str:
    """One Markdown line: backbone, strategy, test accuracy, classes, input size."""

    info = run.info.to_dict()
    backbone = run.metrics.get("model", {}).get("backbone") or info["backbone"]["origin"]
    parts = [f"backbone **{backbone}**", f"strategy **{run.strategy}**"]
    test = run.metrics.get("test") or {}
    if test.get("accuracy") is not None:
        parts.append(f"test accuracy **{test['accuracy']:.1%}** (n={test.get('n', '?')})")
    parts += [f"{len(run.classes)} classes", f"{run.preprocessing.input_size} px input"]
    return " · ".join(parts)


def build_app(run: Run | str | os.PathLike[str], top_k: int = 5, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
              concurrency: int = DEFAULT_CONCURRENCY) -> gr.Blocks:
    """The Gradio page and its `/predict` endpoint for a run (launch it with `serve`, or `.launch()` in tests)."""
    gr = _import_gradio()
    from .saved import Run

    if not isinstance(run, Run):
        run = Run.load(run)
    if top_k < 1:
        raise AffinageError(f"top-k must be >= 1, got {top_k}", "pass --top-k 5 (or any positive number)")
    if concurrency < 1:
        raise AffinageError(f"concurrency must be >= 1, got {concurrency}", "pass --concurrency 8 (or any positive number)")
    if max_upload_mb <= 0:
        raise AffinageError(f"max upload size must be > 0 MB, got {max_upload_mb}", "pass --max-upload-mb 20")
    model = BatchingModel(run)
    max_bytes = int(max_upload_mb * 1e6)
    classes = run.classes

    tasks = run.tasks

    def predict(image: dict[str, Any] | None) -> Any:
        # preprocess=False: Gradio hands over the uploaded file untouched (no re-encoding), as {"path": ...}
        if not image:
            return None if len(tasks) == 1 else [None] * len(tasks)
        path = image["path"] if isinstance(image, dict) else str(image)
        name = (image.get("orig_name") if isinstance(image, dict) else None) or Path(path).name
        size = os.path.getsize(path)
        if size > max_bytes:
            raise gr.Error(f"{name} is {size / 1e6:.1f} MB; this server accepts photos up to {max_upload_mb:g} MB.",
                           title="File too large", print_exception=False)
        start = time.perf_counter()
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            pixels = load_pixels(data, run.preprocessing)
        except UnreadableImage as exc:
            raise gr.Error(f"{name} cannot be used: {exc}. Upload a JPEG, PNG, WebP, BMP or TIFF photo.",
                           title="Not a usable photo", print_exception=False) from None
        decoded = time.perf_counter()
        rows = run.split_tasks(model.probabilities(pixels))
        answers = [{t["label"]: t["probability"] for t in top_labels(row, list(space.classes), top_k)}
                   for row, space in zip(rows, tasks)]
        model.stats.add(requests=1, decode_s=decoded - start, handler_s=time.perf_counter() - start)
        return answers[0] if len(tasks) == 1 else answers

    examples = held_out_photos(run, MAX_EXAMPLES)
    with gr.Blocks(title=f"affinage · {run.path.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## {run.path.name}\n{model_facts(run)}")
        with gr.Row():
            image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="photo",
                             height=320, elem_id="photo")
            with gr.Column():  # one label per task (several labels per image: one head each)
                labels = [gr.Label(num_top_classes=min(top_k, len(space)),
                                   label="prediction" if len(tasks) == 1 else space.task,
                                   elem_id="prediction" if k == 0 else f"prediction-{k}")
                          for k, space in enumerate(tasks)]
        if examples:
            gr.Examples(examples=[[p] for p in examples], inputs=[image], label="photos from the run's test split",
                        examples_per_page=len(examples))
        named = "; ".join(f"{s.task}: {', '.join(s.classes)}" for s in tasks) if len(tasks) > 1 else ", ".join(classes)
        gr.Markdown(f"Classes: {named}. The model always answers with one of these, even for a photo "
                    f"of something else. Uploads up to {max_upload_mb:g} MB.")
        with gr.Accordion("What the model gets wrong (its test split)", open=False, elem_id="gallery"):
            from .gallery import gallery_page

            gr.HTML(gallery_page(run.path), elem_id="gallery-html")
        image.change(predict, inputs=image, outputs=labels[0] if len(tasks) == 1 else labels, api_name="predict",
                     preprocess=False,
                     concurrency_limit=concurrency, show_progress="minimal")
    app.queue(default_concurrency_limit=concurrency)
    app._affinage_model = model  # type: ignore[attr-defined]  # kept alive with the app; tests may close it
    return app


def launch_options(host: str, port: int | None, max_upload_mb: float) -> dict[str, Any]:
    """`Blocks.launch` arguments: local only unless `host` says otherwise, never a public share link, no
    server-side rendering process, no MCP server, no monitoring page."""
    return {"server_name": host, "server_port": port, "share": False, "max_file_size": int(max_upload_mb * 1e6),
            "ssr_mode": False, "mcp_server": False, "enable_monitoring": False, "footer_links": ["api"],
            "show_error": False}


def model_threads(workers: int = DEFAULT_MODEL_WORKERS) -> int:
    """Give each model worker an equal share of this process's cores as torch intra-op threads (unless
    OMP_NUM_THREADS says otherwise): on 2 cores, 2 workers of 1 thread serve more than 1 worker of 2, whose threads
    wait on each other whenever the web server takes a core."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))
    return torch.get_num_threads()


def write_stats_on_signal(stats: ServeStats, path: str) -> None:
    """Write the server's counters to `path` whenever it gets SIGUSR1 (`kill -USR1 PID`) and when it exits."""
    import atexit
    import signal

    atexit.register(stats.write, path)
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: stats.write(path))


def serve(run_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = DEFAULT_PORT, top_k: int = 5,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, concurrency: int = DEFAULT_CONCURRENCY,
          prevent_thread_lock: bool = False) -> gr.Blocks:
    """Serve a run directory at http://host:port (blocks until interrupted unless `prevent_thread_lock`)."""
    from .saved import Run

    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # Gradio checks its own URL over HTTP
    model_threads()
    run = Run.load(run_dir)
    app = build_app(run, top_k=top_k, max_upload_mb=max_upload_mb, concurrency=concurrency)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"affinage: serving on {host}: reachable from other machines, without authentication", flush=True)
    try:
        app.launch(prevent_thread_lock=True, quiet=True, **launch_options(host, port, max_upload_mb))
    except OSError as exc:
        raise AffinageError(f"cannot listen on {host}:{port}: {exc}", "pick a free port with --port") from exc
    stats_path = os.environ.get(STATS_ENV)
    if stats_path:
        write_stats_on_signal(app._affinage_model.stats, stats_path)  # type: ignore[attr-defined]
    print(f"affinage: serving {run.path} at {app.local_url} (API: /predict) — Ctrl+C to stop", flush=True)
    if not prevent_thread_lock:
        app.block_thread()
    return app
