"""The audit's checks of the maps themselves: faithfulness to the model and the randomisation sanity test.

- :func:`faithfulness_section`: deletion, insertion (and ROAD MoRF/LeRF) curves of the served maps on the
  positive probing images of every class, against a seeded random pixel order
  (:func:`interpret.faithfulness.faithfulness`), one batch of (image, class) pairs per metric.
- :func:`sanity_section`: the model-parameter randomisation test (Adebayo et al. 2018), cascading and
  independent, on a seeded subset of the probing images for every class
  (:func:`interpret.sanity.model_randomisation`).
- :func:`randomisation_examples` and :func:`curve_plots`: the pictures the report shows.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from interpret.audit.probe import Probe
from interpret.audit.report import figure_png
from interpret.devices import to_numpy

log = logging.getLogger(__name__)

__all__ = ["faithfulness_pairs", "faithfulness_section", "sanity_images", "sanity_section",
           "randomisation_examples", "curve_plot_png", "randomisation_plot_png"]


def faithfulness_pairs(probe: Probe, max_per_class: int, seed: int = 0) -> list[tuple[int, int]]:
    """``(image index, class index)`` pairs: every class's positive probing images, at most
    ``max_per_class`` of them drawn with ``seed`` (0 = all)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for c in range(len(probe.classes)):
        idx = np.flatnonzero(probe.labels[:, c] > 0)
        if max_per_class and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        pairs += [(int(i), c) for i in idx]
    return pairs


def _maps_for_pairs(model, probe: Probe, pairs: Sequence[tuple[int, int]], method: str, batch_size: int):
    """The served maps (B, 1, S, S) of each (image, class) pair."""
    import torch

    from interpret import attention_maps

    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x = probe.images[[i for i, _ in chunk]]
        t = torch.tensor([[c] for _, c in chunk])
        out.append(attention_maps(model, x, t, method=method).float())
    return torch.cat(out) if out else torch.empty(0, 1, probe.size, probe.size)


def faithfulness_section(model, probe: Probe, method: str, *, metrics: Sequence[str], steps: int, baseline: str,
                         max_per_class: int, batch_size: int, seed: int = 0, road_max_per_class: int | None = None):
    """Faithfulness of the served maps on every class's positive probing images.

    Args:
        model: the classifier (``model(x) -> logits``; a :class:`interpret.models.DwarfClassifierView` too).
        probe: the probing set.
        method: the attention method whose maps are scored (the audit's, i.e. the served one).
        metrics: names of :data:`interpret.faithfulness.FAITHFULNESS_METRICS`.
        steps: perturbation steps per curve; baseline: deletion/insertion baseline image.
        max_per_class: positives per class scored (0 = all).
        road_max_per_class: positives per class for the ROAD metrics (their imputation solves a linear system
            per image and step; default ``max_per_class``).
        batch_size: images per forward pass.
        seed: pair sampling, random orders and ROAD's noise.

    Returns:
        ``(table, results_by_metric)``: the rows of :meth:`interpret.faithfulness.FaithfulnessResult.to_frame`
        for every metric (``image_id, class, metric, auc, random_auc, gain, curve, random_curve, ...``; ROAD
        has no random order: its ``random_auc`` and ``gain`` are NaN) and the
        :class:`~interpret.faithfulness.FaithfulnessResult` objects per metric (one per group of images scored
        for the same number of classes).
    """
    import pandas as pd
    import torch

    from interpret.faithfulness import faithfulness

    road_cap = max_per_class if road_max_per_class is None else road_max_per_class
    frames, results = [], {}
    for cap, group in ((max_per_class, [m for m in metrics if not m.startswith("road")]),
                       (road_cap, [m for m in metrics if m.startswith("road")])):
        pairs = faithfulness_pairs(probe, cap, seed)
        if not group or not pairs:
            continue
        # one call per number of classes an image is scored for, with all of an image's classes as its targets:
        # the random-order curves are computed once per image and shared by its classes
        by_image: dict[int, list[int]] = {}
        for i, c in pairs:
            by_image.setdefault(i, []).append(c)
        for k in sorted({len(cs) for cs in by_image.values()}):
            idx = [i for i, cs in by_image.items() if len(cs) == k]
            targets = torch.tensor([by_image[i] for i in idx])  # (B, k)
            flat = [(i, c) for i in idx for c in by_image[i]]
            maps = _maps_for_pairs(model, probe, flat, method, min(batch_size, 32))  # (B * k, 1, S, S)
            maps = maps.view(len(idx), k, probe.size, probe.size)
            x = probe.images[idx]  # (B, 1, S, S)
            ids = [probe.image_ids[i] for i in idx]
            for metric in group:
                road = metric.startswith("road")
                # ROAD compares MoRF with LeRF (Rong et al. 2022), not with a random order: none is drawn
                res = faithfulness(model, x, targets, maps, metric, steps=steps, baseline=None if road else baseline,
                                   batch_size=batch_size, seed=seed, random_repeats=0 if road else 1)
                results.setdefault(metric, []).append(res)
                frames.append(res.to_frame(ids, probe.classes))
    if not frames:
        return pd.DataFrame(columns=["image_id", "class", "metric", "auc", "random_auc", "gain"]), {}
    table = pd.concat(frames, ignore_index=True)
    table.insert(3, "method", method)
    return table, results


def sanity_images(probe: Probe, n: int, seed: int = 0) -> np.ndarray:
    """A seeded subset of ``n`` probing images, images with findings first (their maps carry evidence)."""
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(probe.labels.max(1) > 0)
    neg = np.flatnonzero(probe.labels.max(1) <= 0)
    order = np.concatenate([rng.permutation(pos), rng.permutation(neg)])
    return np.sort(order[:n])


def sanity_section(model, probe: Probe, method: str, *, n_images: int, batch_size: int, seed: int = 0,
                   layers: Sequence[str] | None = None):
    """The randomisation test for every class on ``n_images`` probing images (cascading and independent).

    Returns:
        The table of :func:`interpret.sanity.model_randomisation` with ``class`` and ``image_id`` added.
    """
    import torch

    from interpret.sanity import model_randomisation

    idx = sanity_images(probe, n_images, seed)
    c = len(probe.classes)
    targets = torch.arange(c).expand(len(idx), c)
    table = model_randomisation(model, probe.images[idx], targets, method, mode=("cascading", "independent"),
                                layers=layers, seed=seed, batch_size=batch_size)
    table["class"] = [probe.classes[t] for t in table["target"]]
    table["image_id"] = [probe.image_ids[idx[i]] for i in table["image_index"]]
    return table


def randomisation_examples(model, image, target: int, method: str, layers: Sequence[str], seed: int = 0
                           ) -> list[tuple[str, np.ndarray]]:
    """The served map of one image and class on the original model and after each cascading step, with the
    same block seeds as :func:`interpret.sanity.model_randomisation`.

    Returns:
        ``[(label, (S, S) map)]``: ``"original"``, then ``"+ <block>"`` per step.
    """
    import copy

    import torch

    from interpret import attention_maps
    from interpret.sanity import block_seed, randomise_block_

    work = copy.deepcopy(model)
    t = torch.tensor([[int(target)]])
    out = [("original", to_numpy(attention_maps(work, image[None], t, method=method)[0, 0].float()))]
    for name in layers:
        randomise_block_(work.get_submodule(name), block_seed(seed, name))
        out.append((f"+ {name}", to_numpy(attention_maps(work, image[None], t, method=method)[0, 0].float())))
    return out


def randomisation_plot_png(image: np.ndarray, examples: Sequence[tuple[str, np.ndarray]], title: str) -> bytes:
    """A row of overlays: the image with the original map, then with each cascading step's map."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(examples)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.3), dpi=90, squeeze=False)
    try:
        for ax, (label, m) in zip(axes[0], examples):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(label, fontsize=7)
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
    except Exception:
        plt.close(fig)
        raise
    return figure_png(fig)


def curve_plot_png(table, metric: str, classes: Sequence[str]) -> bytes | None:
    """Mean curve per class (solid: the map's order; dashed: random order, where one was drawn) of one metric, with
    the 95% interval of the per-image curves' mean (normal approximation, shaded)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    part = table[table["metric"] == metric]
    if len(part) == 0:
        return None
    shown = [c for c in classes if (part["class"] == c).any()]
    cols = min(4, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), dpi=90, squeeze=False)
    try:
        for ax in axes.ravel()[len(shown):]:
            ax.axis("off")
        for ax, cls in zip(axes.ravel(), shown):
            g = part[part["class"] == cls]
            x = np.asarray(g["fractions"].iloc[0], dtype=float)
            for col, style, label in (("curve", "-", "map order"), ("random_curve", "--", "random order")):
                y = np.stack([np.asarray(v, dtype=float) for v in g[col]])  # (n, S+1)
                if not np.isfinite(y).any():  # ROAD draws no random order
                    continue
                mean = y.mean(0)
                half = 1.96 * y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(mean)
                ax.plot(x, mean, style, label=label, linewidth=1.2)
                ax.fill_between(x, mean - half, mean + half, alpha=0.2)
            ax.set_title(f"{cls} (n={len(g)})", fontsize=8)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
        axes[0, 0].legend(fontsize=6)
        what = "revealed" if metric in ("insertion",) else "removed"
        fig.suptitle(f"{metric}: class probability vs fraction of pixels {what}", fontsize=9)
    except Exception:
        plt.close(fig)
        raise
    return figure_png(fig)
