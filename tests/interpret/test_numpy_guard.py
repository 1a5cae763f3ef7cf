"""Static guard: no torch tensor in ``interpret/`` becomes a NumPy array without passing through the CPU.

``tensor.numpy()`` fails on a CUDA tensor, so a model moved to the GPU (the audit's ``device``) breaks any such
call. Every ``X.numpy()`` call in ``interpret/`` must either have ``.cpu()`` in its chain
(``t.detach().cpu().numpy()``), start from ``torch.from_numpy`` (a CPU tensor by construction), or use
:func:`interpret.devices.to_numpy` instead (then there is no ``.numpy()`` to find). The rest are listed below,
found by inspection, each with the reason it is safe; an entry that no longer matches a call fails too, so the
list cannot go stale.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "interpret"

#: (file relative to the repository, source of the receiver of ``.numpy()``) -> why it is safe.
#: The files below are outside the device change (other owners); every receiver is a CPU tensor, always or where
#: the audit calls it (the audit keeps feature maps, activations and embeddings on the CPU).
ALLOWED: dict[tuple[str, str], str] = {
    ("interpret/annotation/__init__.py", "score_margin(s)"):
        "s = scores.detach().cpu() just above: CPU always",
    ("interpret/annotation/falcon.py", "m"): "an upsampled activation map of CPU activations; not used by the audit",
    ("interpret/evaluation.py", "(emb[ia] * emb[ib]).sum(1)"):
        "emb comes from _encode, which returns .detach().float().cpu(): CPU always",
    ("interpret/dissection.py", "thr"): "unit_thresholds returns thr.cpu(): CPU always",
    ("interpret/dissection.py", "err"): "unit_thresholds returns err.cpu(): CPU always",
    ("interpret/experiments.py", "targets"): "torch.full(...) on the CPU just above; not used by the audit",
    ("interpret/experiments.py", "centre_prior((H, W), centre_sigma)"): "built on the CPU; not used by the audit",
    ("interpret/experiments.py", "minmax_normalize(upsample(noise, (H, W)))"):
        "CPU random maps (CPU generator); not used by the audit",
    ("interpret/experiments.py", "minmax_normalize(upsample(shuf, (H, W)))"):
        "shuffled cells of raw[:, 0].float().cpu() with a CPU order: CPU always",
    ("interpret/audit/probe.py", "it['labels']"): "dataset items (CPU) while the probing set is read",
    ("interpret/audit/probe.py", "it['boxes']"): "dataset items (CPU) while the probing set is read",
    ("interpret/audit/probe.py", "it['box_labels']"): "dataset items (CPU) while the probing set is read",
    ("interpret/audit/probe.py", "artefacts"): "dataset items (CPU) while the probing set is read",
}


def _passes_cpu(receiver: ast.AST) -> bool:
    """Whether the chain ending in ``receiver`` calls ``.cpu()`` or starts at ``torch.from_numpy(...)``."""
    node = receiver
    while True:
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                if f.attr == "cpu":
                    return True
                if f.attr == "from_numpy":
                    return True
                node = f.value
                continue
            return False
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
            continue
        return False


def _unchecked_calls() -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                    and not node.args and not node.keywords and not _passes_cpu(node.func.value)):
                key = (path.relative_to(ROOT).as_posix(), ast.unparse(node.func.value))
                found[key] = node.lineno
    return found


def test_guard_tells_a_cpu_chain_from_a_bare_numpy_call():
    def receiver(src: str) -> ast.AST:
        return ast.parse(src, mode="eval").body.func.value

    assert _passes_cpu(receiver("x.detach().cpu().float().numpy()"))
    assert _passes_cpu(receiver("torch.from_numpy(a).float().mean(1).numpy()"))
    assert not _passes_cpu(receiver("model(x).numpy()"))
    assert not _passes_cpu(receiver("probs[0].float().numpy()"))


def test_no_tensor_becomes_numpy_without_the_cpu():
    found = _unchecked_calls()
    new = {f"{p}:{line}: {src}.numpy()" for (p, src), line in found.items() if (p, src) not in ALLOWED}
    assert not new, ("torch tensors turned into NumPy without .cpu() (fails on CUDA); use "
                     "interpret.devices.to_numpy or .detach().cpu().numpy():\n" + "\n".join(sorted(new)))
    stale = sorted(f"{p}: {src}" for p, src in ALLOWED if (p, src) not in found)
    assert not stale, "allow-list entries that match no call any more (remove them):\n" + "\n".join(stale)
