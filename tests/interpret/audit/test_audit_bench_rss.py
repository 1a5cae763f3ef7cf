"""benchmarks/audit_bench.py --rss: the peak RSS of whole audits at two sizes, and each section's peak (where the
growth per probing image comes from)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[3]
linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


@linux_only
def test_section_peaks_attribute_an_allocation_to_its_section(monkeypatch):
    from benchmarks.audit_bench import _section_peaks
    from interpret.audit import engine

    monkeypatch.setattr(engine._Stages, "__call__", engine._Stages.__call__)  # restored after the test

    class Bar:
        def set_postfix_str(self, _):
            pass

    close = _section_peaks()
    assert close is not None
    stage = engine._Stages(Bar())
    stage("big")
    block = np.ones(64 << 17)  # 64 MiB touched, freed before the next section
    del block
    stage("small")
    peaks = close(None)
    assert set(peaks) == {"startup", "load", "big", "small"}
    assert peaks["big"] - peaks["small"] > 48, peaks  # the freed block counts in its own section only
    assert stage.times.keys() == {"big"}  # the timer still times


@pytest.mark.slow
@linux_only
def test_rss_cli_prints_one_json_line_with_section_peaks():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/audit_bench.py", "--rss", "12,24", "--size", "64",
                           "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["benchmark"] == "audit_rss" and [r["n_images"] for r in out["runs"]] == [12, 24]
    sections = {"startup", "load", "inference", "attention", "faithfulness", "sanity", "dissection", "concepts",
                "importance", "shortcuts", "ood", "verdicts", "gates", "report"}
    for run in out["runs"]:
        assert set(run["section_peak_mb"]) == sections
        assert run["peak_rss_mb"] >= max(run["section_peak_mb"].values())
        assert run["section_peak_mb"][run["peak_section"]] == max(run["section_peak_mb"].values())
    assert set(out["section_peak_growth_bytes_per_image"]) == sections
    assert isinstance(out["rss_growth_bytes_per_image"], int)
