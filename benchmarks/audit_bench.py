"""Benchmark of the audit: what faithfulness and the randomisation sanity test cost, side by side.

Runs :func:`interpret.audit.run_audit` on the same probing set and model, alternately

- ``base``: the audit without the new checks (``faithfulness_metrics=""``, ``sanity_images=0``): the sections
  of the audit before faithfulness and sanity existed (performance, localisation, dissection, concepts,
  importance, shortcuts; plus the OOD fit and verdict bookkeeping, both milliseconds), and
- ``full``: the default audit (deletion and insertion curves, cascading and independent randomisation),

and prints one JSON line: the median wall time of each over ``--repeats`` runs, ``full_vs_base`` (the target is
<= 3.0 at 400 probing images x all classes at 128 px), and the median time of each new section in the full runs
(from the section progress), so it is clear where the time goes.

The model is an untrained ``resnet18`` at 128 px over the phantom classes (time does not depend on the weights);
the concept section uses an untrained CLIP (``scratch``) so that the base audit does the work the real one does.

Run: ``python benchmarks/audit_bench.py`` (400 images, 5 repeats each: about 20-30 minutes on 2 cores);
``--images 100 --repeats 5`` for a quicker look.

``--rss 1000,10000`` measures instead whether the audit streams: the whole default audit (every section) of the
same untrained model on N probing images drawn from one phantom, each N in its own process, and prints the
peak resident memory of each process (``ru_maxrss`` from ``wait4``), the growth per probing image between the
smallest and the largest N, and beside it what one image's arrays that the audit keeps on disk
(:mod:`interpret.audit.store`: the image and its feature maps) would add if they were held in memory. Where the
growth comes from is printed too: the peak RSS of each section (the engine's section timer is wrapped in the child;
the kernel's high-water mark is read and reset, ``/proc/self/clear_refs``, at each section boundary; Linux only,
else the sections are left out), its growth per image, and which section holds the process's peak at each N.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _audit_child(manifest: str, images: int, size: int, arch: str, out: str) -> None:
    """One whole default audit (run in a child process by :func:`rss_growth`)."""
    import torch

    from interpret.audit import AuditConfig, run_audit
    from mlflow_projects.common import resolve_clip
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    torch.manual_seed(0)
    model = create_model(arch, classes=list(PHANTOM_CLASSES), image_size=size).eval()
    cfg = AuditConfig(split="all", max_images=images, data=manifest, gallery_n=1)
    clip = resolve_clip("scratch")
    peaks = _section_peaks()
    summary = run_audit(cfg, model, Path(manifest), Path(out), model_info={"uri": "bench"}, clip=clip)
    print(json.dumps({"n_images": summary["data"]["n_images"], "timings": summary.get("timings"),
                      "section_peak_mb": peaks(None) if peaks else None}))


def _hwm_kb() -> int | None:
    """The process's resident high-water mark (kB, ``VmHWM``), None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def _section_peaks():
    """Wrap the audit engine's section timer so that each section's peak RSS is recorded: at each boundary the
    high-water mark of the section that ends is read and the mark is reset to the current RSS (``clear_refs``).

    Returns ``close(None) -> {"startup": MB, "load": MB, <section>: MB, ...}`` (startup: imports, model and CLIP
    before the audit; load: the audit up to its first section, i.e. reading the probing set), or None when the
    mark cannot be read or reset (then the process peak from ``wait4`` is all there is)."""
    from interpret.audit import engine

    stages = getattr(engine, "_Stages", None)
    startup = _hwm_kb()
    if stages is None or startup is None:
        return None
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    peaks: dict[str, float] = {"startup": round(startup / 1024, 1)}
    current = ["load"]
    call = stages.__call__

    def boundary(name: str | None) -> dict[str, float]:
        peaks[current[0]] = max(peaks.get(current[0], 0.0), round(_hwm_kb() / 1024, 1))
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        current[0] = name
        return peaks

    def wrapped(self, name: str) -> None:
        boundary(name)
        call(self, name)

    stages.__call__ = wrapped
    return boundary


def rss_growth(sizes: list[int], size: int, arch: str, threads: int) -> dict:
    """Peak RSS of whole audits at each probing-set size (each in a fresh process)."""
    import subprocess

    import torch

    from training.data.phantom import generate_phantom
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = generate_phantom(tmp / "phantom", n=max(sizes), size=size, seed=0)
        gen_s = time.perf_counter() - t0
        model = create_model(arch, classes=list(PHANTOM_CLASSES), image_size=size).eval()
        with torch.no_grad():
            _, f = model.forward_all(torch.zeros(1, 1, size, size))
        spilled = 4 * (size * size + f[0].numel()) + size * size  # image + maps (float32) + marker mask (bool)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        rows = []
        for n in sizes:
            code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads({threads}); "
                    f"from benchmarks.audit_bench import _audit_child; "
                    f"_audit_child({str(manifest)!r}, {n}, {size}, {arch!r}, {str(tmp / f'audit-{n}')!r})")
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(ROOT),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"the audit of {n} images failed (exit {proc.returncode})")
            got = json.loads(out.decode().strip().splitlines()[-1])
            sec = got.get("section_peak_mb") or {}
            # with the mark reset at section boundaries, wait4's ru_maxrss covers only the last section: the
            # process peak is the largest of the sections' peaks and it
            peak = max([usage.ru_maxrss / 1024] + list(sec.values()))
            row = {"n_images": got["n_images"], "peak_rss_mb": round(peak, 1), "wall_s": round(time.perf_counter() - t0, 1)}
            if sec:
                row["peak_section"] = max(sec, key=sec.get)
                row["section_peak_mb"] = sec
            rows.append(row)
    lo, hi = rows[0], rows[-1]
    dn = max(1, hi["n_images"] - lo["n_images"])
    growth = (hi["peak_rss_mb"] - lo["peak_rss_mb"]) * 2**20 / dn
    out = {"benchmark": "audit_rss", "arch": arch, "image_size": size, "threads": threads,
           "phantom_generation_s": round(gen_s, 1), "runs": rows,
           "rss_growth_bytes_per_image": round(growth),
           "kept_on_disk_bytes_per_image": spilled,
           "growth_vs_in_memory": round(growth / spilled, 4)}
    if "section_peak_mb" in lo and "section_peak_mb" in hi:  # each section's peak, growth per image
        a, b = lo["section_peak_mb"], hi["section_peak_mb"]
        out["section_peak_growth_bytes_per_image"] = {k: round((b[k] - a[k]) * 2**20 / dn) for k in b if k in a}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="where the timed audits run torch (AuditConfig.device: auto, "
                                                   "cpu, cuda, cuda:N); the --rss runs stay on the CPU")
    p.add_argument("--rss", default="", help="comma-separated probing-set sizes, e.g. 1000,10000: measure the "
                                             "audit's peak RSS at each instead of timing it")
    a = p.parse_args(argv)
    from interpret.devices import check_device_spec

    try:
        check_device_spec(a.device)
    except ValueError as exc:
        p.error(str(exc))
    if a.rss:
        try:
            sizes = sorted({int(v) for v in a.rss.split(",") if v.strip()})
        except ValueError:
            p.error(f"--rss takes comma-separated integers, got {a.rss!r}")
        if len(sizes) < 2 or sizes[0] < 1:
            p.error("--rss needs at least two positive sizes, e.g. 1000,10000")
        print(json.dumps(rss_growth(sizes, a.size, a.arch, a.threads)))
        return 0
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(a.threads)
    from interpret.audit import AuditConfig, run_audit
    from mlflow_projects.common import resolve_clip
    from training.data.phantom import generate_phantom
    from training.data.schema import PHANTOM_CLASSES
    from training.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = generate_phantom(tmp / "phantom", n=a.images, size=a.size, seed=0)
        torch.manual_seed(0)
        model = create_model(a.arch, classes=list(PHANTOM_CLASSES), image_size=a.size).eval()
        clip = resolve_clip("scratch")
        common = dict(split="all", max_images=a.images, data=str(manifest), gallery_n=1, device=a.device)
        configs = {"base": AuditConfig(**common, faithfulness_metrics="", sanity_images=0),
                   "full": AuditConfig(**common)}
        times: dict[str, list[float]] = {"base": [], "full": []}
        sections: dict[str, list[float]] = {}
        for r in range(a.repeats):
            for name, cfg in configs.items():  # alternate, so drifts in machine load hit both alike
                t0 = time.perf_counter()
                summary = run_audit(cfg, model, manifest, tmp / f"{name}-{r}", model_info={"uri": "bench"},
                                    clip=clip)
                times[name].append(time.perf_counter() - t0)
                for sec, secs in (summary.get("timings") or {}).items():
                    if name == "full":
                        sections.setdefault(sec, []).append(secs)
        base, full = statistics.median(times["base"]), statistics.median(times["full"])
        print(json.dumps({
            "benchmark": "audit", "images": a.images, "image_size": a.size, "arch": a.arch,
            "classes": len(PHANTOM_CLASSES), "repeats": a.repeats, "threads": a.threads,
            "device": summary.get("device"), "base_s": round(base, 2), "full_s": round(full, 2), "full_vs_base": round(full / base, 3),
            "base_runs_s": [round(t, 2) for t in times["base"]], "full_runs_s": [round(t, 2) for t in times["full"]],
            "full_section_s": {k: round(statistics.median(v), 2) for k, v in sections.items()},
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
