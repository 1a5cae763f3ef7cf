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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
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
        common = dict(split="all", max_images=a.images, data=str(manifest), gallery_n=1)
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
            "base_s": round(base, 2), "full_s": round(full, 2), "full_vs_base": round(full / base, 3),
            "base_runs_s": [round(t, 2) for t in times["base"]], "full_runs_s": [round(t, 2) for t in times["full"]],
            "full_section_s": {k: round(statistics.median(v), 2) for k, v in sections.items()},
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
