"""Serving benchmark: the real service over HTTP on loopback vs ONNX Runtime in-process, same images, same run.

    python benchmarks/serve_bench.py [--arch resnet18 --image-size 128 --n 24 --requests 32]
    python benchmarks/serve_bench.py --model-uri models:/cxr-classifier@champion   # an existing registry

Without ``--model-uri`` a randomly initialised classifier (``--arch``) is exported, logged and registered in a
temporary MLflow store (the contract layout: checkpoint.pt, model.onnx, meta.json). Then ``bentoml serve
service:CXRExplainer`` starts on a free loopback port (explanation cache off, so every request computes), and
for ``/predict``, ``/explain method=cam`` and ``/explain method=gradcam`` at concurrency 1 and 8 it measures
p50/p95 latency (ms) and throughput (requests/s); the in-process baseline is ONNX Runtime's ``run`` on the
preprocessed images (one at a time, same thread count as the server) and the same plus PNG decoding and
resizing. Explanations ask for one target each (``targets`` = the first class). ``side_by_side_c1`` interleaves
in-process decode + preprocess + ORT, ``/predict`` and ``/explain method=cam`` image by image and gives medians of
the per-image ratios (the figures to quote on a busy machine); ``stages_ms`` says where the time goes;
``core_predict_no_http`` runs ``/predict``'s work through the service core and its micro-batcher in-process
(asyncio tasks, no HTTP) at each concurrency.
Every HTTP cell also gives the CPU milliseconds per request of the server's process tree and of this client
(which shares the machine's cores on loopback) and ``cpu_bound_rps``, the rate those allow on the cores: at
concurrency 8 the measured rate against it says whether the cores or the batching bound the throughput.
Prints one JSON line with the figures and the ratios issue 15 targets: ``side_by_side_c1``
``predict_vs_inprocess`` (<= 1.3, against decode + preprocess + ORT) and ``explain_cam_vs_predict`` (<= 1.15),
``predict_throughput_gain_c8_vs_c1`` (>= 1.8); ``inprocess_ort_batch8`` is ONNX Runtime on 8 images at once against 8
single runs (per image, side by side): what batching can save.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(tmp: Path, arch: str, size: int) -> str:
    import mlflow
    import torch

    from mlflow_projects.common import register_version, setup_tracking
    from training.data.schema import PHANTOM_CLASSES
    from training.export import export_onnx
    from training.models import create_model, save_checkpoint

    class Probabilities(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from training.models import load_checkpoint

            self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()

        def predict(self, context, model_input, params=None):
            with torch.no_grad():
                return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).sigmoid().numpy()

    torch.manual_seed(0)
    model = create_model(arch, classes=list(PHANTOM_CLASSES), image_size=size).eval()
    ckpt = save_checkpoint(model, tmp / "checkpoint.pt")
    onnx = export_onnx(model, tmp / "model.onnx", image_size=size)
    meta = {"arch": model.arch, "classes": model.class_names, "thresholds": model.thresholds, "input": model.input_spec,
            "feature_layer": model.feature_layer, "head": "gap_linear"}
    (tmp / "meta.json").write_text(json.dumps(meta))
    setup_tracking("cxr-classifier")
    with mlflow.start_run(run_name="serve-bench"):
        info = mlflow.pyfunc.log_model(name="model", python_model=Probabilities(),
                                       artifacts={"checkpoint": str(ckpt), "model_onnx": str(onnx),
                                                  "meta": str(tmp / "meta.json")})
    return str(register_version(info.model_uri, "cxr-classifier", {"classes": model.class_names}).version)


def _images(n: int, side: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:side, 0:side] / side
    for _ in range(n):
        base = 0.5 + 0.3 * np.sin(6 * xx + rng.random() * 3) * np.cos(4 * yy) + 0.1 * rng.standard_normal((side, side))
        buf = io.BytesIO()
        Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _stats(lat: list[float], wall: float) -> dict:
    a = np.asarray(lat) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "rps": round(len(a) / wall, 1)}


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (the server and its workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _http_cell(base: str, headers: dict, route: str, data: dict, images: list[bytes], requests: int, conc: int,
               server_pid: int | None = None) -> dict:
    """p50/p95 latency and throughput of ``requests`` posts at concurrency ``conc``; with ``server_pid``, also
    the CPU milliseconds per request spent by the server (process tree) and by this client process, and the
    throughput those allow on this machine's cores (``cpu_bound_rps`` = cores / CPU per request): when the
    measured rate is close to it, the cores, not the batching, bound the rate."""
    import httpx

    clients = [httpx.Client(base_url=base, headers=headers, timeout=300) for _ in range(conc)]

    def one(i: int) -> float:
        c = clients[i % conc]
        t0 = time.perf_counter()
        r = c.post(route, files={"image": ("x.png", images[i % len(images)], "image/png")}, data=data)
        if r.status_code != 200:
            raise RuntimeError(f"{route} {data}: {r.status_code} {r.text[:200]}")
        return time.perf_counter() - t0

    for i in range(min(conc, 4)):  # warm-up
        one(i)
    s0 = _tree_cpu_s(server_pid) if server_pid else 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as pool:
        lat = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    client_s = time.process_time() - c0
    for c in clients:
        c.close()
    out = _stats(lat, wall)
    if server_pid:
        server_s = _tree_cpu_s(server_pid) - s0
        cores = len(os.sched_getaffinity(0))
        out.update(server_cpu_ms_per_request=round(server_s / requests * 1000, 2),
                   client_cpu_ms_per_request=round(client_s / requests * 1000, 2),
                   cpu_bound_rps=round(cores * requests / max(server_s + client_s, 1e-9), 1))
    return out


def _core_cells(core, images: list[bytes], requests: int, concurrency: list[int]) -> dict:
    """``/predict``'s work without HTTP: the service core's ``apredict`` (decode in a worker thread, the
    micro-batcher, the response dict) driven by ``conc`` asyncio tasks; rate, p50 and the mean batch size per
    concurrency. Against the HTTP cells this separates what the batching gains from what the HTTP layer costs."""
    import asyncio

    out = {}
    for conc in concurrency:
        async def run() -> tuple[list[float], float]:
            sem, lat = asyncio.Semaphore(conc), []

            async def one(i: int) -> None:
                async with sem:
                    t0 = time.perf_counter()
                    await core.apredict(images[i % len(images)])
                    lat.append(time.perf_counter() - t0)

            for i in range(min(conc, 4)):  # warm-up
                await one(i)
            b0, n0 = core.batcher.batches, core.batcher.items
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(requests)))
            wall = time.perf_counter() - t0
            out[f"mean_batch_c{conc}"] = round((core.batcher.items - n0) / max(core.batcher.batches - b0, 1), 2)
            return lat[-requests:], wall

        lat, wall = asyncio.run(run())
        out[f"c{conc}"] = _stats(lat, wall)
        out[f"c{conc}"]["mean_batch"] = out.pop(f"mean_batch_c{conc}")
    lo, hi = min(concurrency), max(concurrency)
    if hi > lo:
        out[f"throughput_gain_c{hi}_vs_c{lo}"] = round(out[f"c{hi}"]["rps"] / out[f"c{lo}"]["rps"], 3)
    return out


def _stage_breakdown(lm, images: list[bytes], cfg, requests: int) -> dict:
    """Median milliseconds of each step of ``/predict`` and ``/explain method=cam`` run in-process, one image at
    a time: decode, resize (preprocess), ORT, the CAM map, the three PNG encodings of a response, JSON."""
    import statistics

    from mlflow_projects.serving import decode_upload, preprocess
    from mlflow_projects.serving.explain import explanation_maps
    from mlflow_projects.serving.images import display_png, grey_png, overlay_png

    times: dict[str, list[float]] = {}

    def clock(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        return out

    for i in range(max(requests, 5)):
        img = clock("decode", decode_upload, images[i % len(images)], 50_000_000)
        x = clock("resize", preprocess, img.pixels, lm.image_size)[None]
        out = clock("ort", lm.run_batch, x)[0]
        clock("json_predict", json.dumps, {"findings": out["probabilities"].tolist(), "image": {"sha256": img.sha256}})
        maps, raw = clock("map", explanation_maps, lm, x, [0], "cam", out)
        ov = clock("png_overlay", overlay_png, img.pixels, maps[0], cfg.overlay_max_side)
        mp = clock("png_map", grey_png, raw[0])
        im = clock("png_image", display_png, img.pixels, cfg.overlay_max_side)
        clock("json_explain", json.dumps, {"findings": out["probabilities"].tolist(), "heatmaps": [
            {"overlay_png": ov[0], "map_png": mp[0]}], "image_png": im[0]})
    return {k: round(statistics.median(v[1:] or v), 3) for k, v in times.items()}


def _side_by_side_c1(base: str, lm, images: list[bytes], target: str, requests: int) -> dict:
    """Concurrency 1, interleaved: per image, in-process decode + preprocess + ORT, then ``/predict``, then
    ``/explain method=cam`` over HTTP, back to back; ratios are medians of the per-image ratios (so load from
    other processes hits all three alike)."""
    import statistics

    import httpx

    from mlflow_projects.serving import decode_upload, preprocess

    rows = []
    with httpx.Client(base_url=base, timeout=300) as client:
        for i in range(requests + 3):  # 3 warm-up rounds
            data = images[i % len(images)]
            t0 = time.perf_counter()
            x = preprocess(decode_upload(data, 50_000_000).pixels, lm.image_size)[None]
            lm.session.run(["logits", "features"], {"images": x})
            t1 = time.perf_counter()
            r1 = client.post("/predict", files={"image": ("x.png", data, "image/png")})
            t2 = time.perf_counter()
            r2 = client.post("/explain", files={"image": ("x.png", data, "image/png")},
                             data={"method": "cam", "targets": target})
            t3 = time.perf_counter()
            if r1.status_code != 200 or r2.status_code != 200:
                raise RuntimeError(f"side-by-side: {r1.status_code} {r2.status_code} {r2.text[:200]}")
            if i >= 3:
                rows.append((t1 - t0, t2 - t1, t3 - t2))
    med = lambda v: statistics.median(v)  # noqa: E731
    return {"inprocess_ms": round(med([r[0] for r in rows]) * 1000, 2),
            "predict_ms": round(med([r[1] for r in rows]) * 1000, 2),
            "explain_cam_ms": round(med([r[2] for r in rows]) * 1000, 2),
            "predict_vs_inprocess": round(med([r[1] / r[0] for r in rows]), 3),
            "explain_cam_vs_predict": round(med([r[2] / r[1] for r in rows]), 3)}


def _record_cost(folder: Path, body_bytes: int, repeats: int = 200) -> dict:
    """Milliseconds the per-request record middleware adds to a request whose response has ``body_bytes``: the
    same trivial ASGI app with and without :class:`~mlflow_projects.serving.records.RecordMiddleware`, timed
    alternately (medians)."""
    import asyncio
    import statistics

    from mlflow_projects.serving.records import RecordMiddleware

    body = b"x" * body_bytes

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    wrapped = RecordMiddleware(app, folder=folder)

    async def recv():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def sink(message):
        pass

    async def one(a):
        scope = {"type": "http", "path": "/predict", "method": "POST", "headers": []}
        t0 = time.perf_counter()
        await a(scope, recv, sink)
        return time.perf_counter() - t0

    async def run():
        plain, rec = [], []
        for _ in range(repeats):
            plain.append(await one(app))
            rec.append(await one(wrapped))
        return statistics.median(rec) - statistics.median(plain)

    return {"response_bytes": body_bytes, "added_ms": round(asyncio.run(run()) * 1000, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=128, help="model input side")
    p.add_argument("--image-side", type=int, default=256, help="side of the uploaded PNGs")
    p.add_argument("--n", type=int, default=16, help="distinct images")
    p.add_argument("--requests", type=int, default=32, help="requests per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--model-uri", default=None, help="serve this registered model instead of a fresh one")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = the service's default)")
    args = p.parse_args(argv)

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    env = dict(os.environ, BENTOML_HOME=str(tmp / "bentoml"), CXR_CACHE_SIZE="0", BENTOML_DO_NOT_TRACK="True",
               CXR_SERVE_CACHE=str(tmp / "cache"), CXR_FEEDBACK_DIR=str(tmp / "feedback"), PYTHONPATH=str(ROOT))
    env.pop("CXR_API_KEYS", None)
    if args.threads:
        env["CXR_THREADS"] = str(args.threads)
    if args.model_uri:
        env["CXR_MODEL_URI"] = args.model_uri
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["CXR_ARTIFACT_ROOT"] = env["CXR_ARTIFACT_ROOT"] = str(tmp / "artifacts")
        (tmp / "model").mkdir()
        _register(tmp / "model", args.arch, args.image_size)
        env["CXR_MODEL_URI"] = "models:/cxr-classifier@candidate"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", "service:CXRExplainer", "--host",
                             "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server not ready in 300 s")
            time.sleep(0.5)
        images = _images(args.n, args.image_side)
        served = httpx.post(f"{base}/predict", files={"image": ("x.png", images[0])}, timeout=60).json()["model"]

        # in-process ONNX Runtime on the very model the server loaded
        import mlflow

        from mlflow_projects.common import resolve_model_uri
        from mlflow_projects.serving import ServeConfig, decode_upload, load_model, preprocess

        mlflow.set_tracking_uri(env.get("MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI"))
        cfg = ServeConfig(threads=args.threads, cache_dir=str(tmp / "cache-local"))
        lm = load_model(resolve_model_uri(served["uri"]), cfg)
        xs = [preprocess(decode_upload(b, 50_000_000).pixels, lm.image_size)[None] for b in images]
        for x in xs[:4]:
            lm.session.run(["logits", "features"], {"images": x})
        lat, t0 = [], time.perf_counter()
        for i in range(args.requests):
            s = time.perf_counter()
            lm.session.run(["logits", "features"], {"images": xs[i % len(xs)]})
            lat.append(time.perf_counter() - s)
        inproc = _stats(lat, time.perf_counter() - t0)
        lat, t0 = [], time.perf_counter()
        for i in range(args.requests):
            s = time.perf_counter()
            x = preprocess(decode_upload(images[i % len(images)], 50_000_000).pixels, lm.image_size)[None]
            lm.session.run(["logits", "features"], {"images": x})
            lat.append(time.perf_counter() - s)
        inproc_full = _stats(lat, time.perf_counter() - t0)
        # what batching can save: ORT on 8 images at once vs 8 single runs, per image, side by side
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from timing import side_by_side

        x8 = np.concatenate([xs[i % len(xs)] for i in range(8)])
        run = lm.session.run
        t_single, t_batch, ratio8 = side_by_side(lambda: [run(["logits", "features"], {"images": x8[i:i + 1]})
                                                          for i in range(8)],
                                                 lambda: run(["logits", "features"], {"images": x8}), 5)
        ort_batch = {"single_ms_per_image": round(t_single / 8 * 1000, 2),
                     "batch8_ms_per_image": round(t_batch / 8 * 1000, 2), "batch8_vs_single": round(ratio8, 3)}

        breakdown = _stage_breakdown(lm, images, cfg, args.requests)
        from mlflow_projects.serving import ExplanationService

        core = ExplanationService(ServeConfig(model_uri=served["uri"], tracking_uri=mlflow.get_tracking_uri(),
                                              threads=args.threads, cache_size=0,
                                              cache_dir=str(tmp / "cache-core"), feedback_dir=str(tmp / "fb-core")))
        core.load()
        core_cells = _core_cells(core, images, args.requests, args.concurrency)

        result = {"bench": "serve", "arch": args.arch if not args.model_uri else served["uri"],
                  "image_size": lm.image_size, "upload_side": args.image_side, "requests_per_cell": args.requests,
                  "ort_threads": cfg.intra_op_threads, "model": served, "inprocess_ort": inproc,
                  "inprocess_decode_preprocess_ort": inproc_full, "inprocess_ort_batch8": ort_batch,
                  "core_predict_no_http": core_cells,
                  "explain_targets": 1}
        target = lm.classes[0]  # one target per explanation, so that explain and predict do comparable work
        cells = {"predict": ("/predict", {}), "explain_cam": ("/explain", {"method": "cam", "targets": target}),
                 "explain_gradcam": ("/explain", {"method": "gradcam", "targets": target})}
        for conc in args.concurrency:
            for name, (route, data) in cells.items():
                result[f"{name}_c{conc}"] = _http_cell(base, {}, route, data, images, args.requests, conc, proc.pid)
        c1 = min(args.concurrency)
        result["explain_cam_vs_predict_c1"] = round(result[f"explain_cam_c{c1}"]["p50_ms"] / result[f"predict_c{c1}"]["p50_ms"], 3)
        result["explain_gradcam_vs_predict_c1"] = round(result[f"explain_gradcam_c{c1}"]["p50_ms"] / result[f"predict_c{c1}"]["p50_ms"], 3)
        result["predict_vs_inprocess_c1"] = round(result[f"predict_c{c1}"]["p50_ms"] / inproc_full["p50_ms"], 3)
        result["predict_vs_inprocess_ort_only_c1"] = round(result[f"predict_c{c1}"]["p50_ms"] / inproc["p50_ms"], 3)
        if len(args.concurrency) > 1:
            hi = max(args.concurrency)
            result["predict_throughput_gain_c%d_vs_c%d" % (hi, c1)] = round(
                result[f"predict_c{hi}"]["rps"] / result[f"predict_c{c1}"]["rps"], 3)
            # the most the cores allow: all cores busy at c_hi's CPU cost per request, against c1's rate
            result["predict_throughput_gain_cpu_bound_c%d_vs_c%d" % (hi, c1)] = round(
                result[f"predict_c{hi}"]["cpu_bound_rps"] / result[f"predict_c{c1}"]["rps"], 3)
        result["side_by_side_c1"] = _side_by_side_c1(base, lm, images, target, args.requests)
        # where the time goes: in-process stage medians; HTTP = the route's p50 minus their sum
        result["stages_ms"] = breakdown
        pred_sum = sum(breakdown[k] for k in ("decode", "resize", "ort", "json_predict"))
        cam_sum = pred_sum - breakdown["json_predict"] + sum(
            breakdown[k] for k in ("map", "png_overlay", "png_map", "png_image", "json_explain"))
        result["stages_ms"]["http_and_rest_predict"] = round(result[f"predict_c{c1}"]["p50_ms"] - pred_sum, 2)
        result["stages_ms"]["http_and_rest_explain_cam"] = round(result[f"explain_cam_c{c1}"]["p50_ms"] - cam_sum, 2)
        result["record_middleware"] = [_record_cost(tmp / "records-bench", n) for n in (600, 300_000)]
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        vals = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines()
                if ln.startswith(("cxr_batches_total", "cxr_batched_items_total"))}
        if vals.get("cxr_batches_total"):
            result["mean_batch_size"] = round(vals["cxr_batched_items_total"] / vals["cxr_batches_total"], 2)
        print(json.dumps(result))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)  # the registry, artifacts and caches: ~430 MB a run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
