"""Small experiments built from the interpret pieces: localisation of attention maps against chance,
and the interpretation columns of the imbalance study.

:func:`localization_vs_chance` answers "does this method's map cover the findings better than a map
that knows nothing?" per class, on the images of a data set that have boxes. For every (image,
class-with-a-box) pair it scores the method's map and four reference maps with the soft metrics of
:mod:`interpret.localization` (soft IoBB ``sum(A M) / sum(M)``, soft IoR ``sum(A M) / sum(A)``, soft
IoU, pointing game; Khakzar et al., DESIGN.md):

- ``random``: uniform noise drawn at the method's *raw* map resolution (the feature grid for CAM /
  Grad-CAM, the pixel grid for pixel methods), bilinearly upsampled and min-max normalised exactly as
  the method's maps are, so it has the same blob size; ``n_random`` draws per pair, averaged. Its soft
  IoBB is about 0.5 (the mean of a min-max normalised noise map) and its IoR and pointing game about
  the box's share of the image;
- ``shuffled``: the method's own raw map with its cells randomly permuted (``n_random``
  permutations per pair), then ReLU, upsampling and normalisation as usual: a random map with exactly
  the method's value distribution (same mass, same peakiness), so it is the chance level that
  separates *where* a method puts its attention from *how much* of the image it lights up. Soft IoBB
  grows with a map's mass (the uniform map below scores 1), so IoBB is compared with this baseline
  rather than with ``random`` whenever the method's maps are peakier than noise;
- ``uniform``: the constant map ``A = 1`` (attention spread evenly): IoBB 1 by construction, IoR and
  IoU equal to the box's area fraction, pointing game equal to the area fraction (the expected hit
  rate when the tie between all pixels is broken at random). It shows why IoBB is never read alone;
- ``centre``: a centre prior, the isotropic Gaussian ``exp(-r^2 / (2 sigma^2))`` around the image
  centre with ``sigma = centre_sigma * S``, min-max normalised: what a map that only knows "findings
  sit inside the chest" achieves.

A method map with no spatial preference (constant before normalisation, or no positive evidence
after the ReLU, which :func:`interpret.attention.minmax_normalize` turns into all zeros) is scored as
the ``uniform`` map rather than as zeros (which would give IoBB 0 and a pointing hit decided by the
top-left pixel); such maps are counted in ``n_flat``. ``flat="as_is"`` scores them as the zeros they are
(IoBB 0, IoR 0), which is what the imbalance study's authors' code does.

:func:`interpret_table` gives the figures of Khakzar et al.'s Tables 1 and 2 for one classifier on the
boxed images of a split: per class the soft IoBB / IoR of its Grad-CAM maps exactly as the library serves
them (:data:`IMBALANCE_METHOD`: ReLU, bilinear upsampling, min-max; the method scores of
:func:`localization_vs_chance`, without the chance baselines) and the Disjoint / Unique dissection
counts of :func:`interpret.dissection.dissect`.

Example:
    >>> from training.data.dataset import ManifestDataset
    >>> ds = ManifestDataset("phantom/manifest.parquet", image_size=96, split="test")  # doctest: +SKIP
    >>> table = localization_vs_chance(model, ds, method="cam", n_random=8)          # doctest: +SKIP
    >>> table[["n_images", "iobb", "iobb_shuffled", "pointing", "pointing_random"]]   # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from interpret.attention import get_method, list_methods, minmax_normalize, upsample
from interpret.dissection import dissect
from interpret.localization import masks_from_boxes, pointing_game, soft_scores
from training.runtime import collate

logger = logging.getLogger(__name__)

__all__ = ["localization_vs_chance", "interpret_table", "centre_prior", "BASELINES", "METRICS",
           "INTERPRET_COLUMNS", "IMBALANCE_METHOD", "FLAT_SCORING"]

#: Reference maps scored beside the method, in column-suffix order.
BASELINES: tuple[str, ...] = ("random", "shuffled", "uniform", "centre")
#: Per-pair metrics reported for the method and every baseline.
METRICS: tuple[str, ...] = ("iobb", "ior", "iou", "pointing")
#: Columns of :func:`interpret_table`.
INTERPRET_COLUMNS: tuple[str, ...] = ("n_boxed", "n_flat", "iobb", "ior", "disjoint", "unique")
#: The imbalance study's maps: Grad-CAM with ReLU, then min-max, as Khakzar et al.'s code (imba-explain
#: ``GradCAM(relu_attributions=True)`` + ``MinMaxNormalizer``) and as the service serves them
#: (:func:`interpret.attention.finalize_maps` with ``SERVED_RELU``). One departure in order: the authors
#: min-max normalise the low-resolution map and then resize it bilinearly; the library upsamples first, then
#: normalises (the same map up to an affine change when the low-resolution extremes fall between output pixels).
IMBALANCE_METHOD = "gradcam"
#: How :func:`localization_vs_chance` scores a map with no spatial preference.
FLAT_SCORING: tuple[str, ...] = ("uniform", "as_is")


def centre_prior(size: int | tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """Isotropic Gaussian centred on the image, min-max normalised to [0, 1].

    Args:
        size: S or (H, W).
        sigma: standard deviation as a fraction of the shorter side (> 0).

    Returns:
        (H, W) float32 map, 1 at the centre.

    Raises:
        ValueError: ``sigma <= 0``.
    """
    if not sigma > 0:
        raise ValueError(f"centre_sigma must be > 0, got {sigma!r}")
    H, W = (size, size) if np.isscalar(size) else size
    s = sigma * min(H, W)
    y = torch.arange(H, dtype=torch.float32) + 0.5 - H / 2
    x = torch.arange(W, dtype=torch.float32) + 0.5 - W / 2
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * s * s))     # (H, W)
    return minmax_normalize(g)


def _model_classes(model: nn.Module, dataset) -> list[str]:
    names = getattr(model, "class_names", None)
    if names:
        return [str(c) for c in names]
    names = getattr(dataset, "classes", None)
    if not names:
        raise ValueError("the model has no class_names and the dataset no classes; cannot match box "
                         "labels to model outputs")
    return [str(c) for c in names]


def _boxed_pairs(dataset, to_model: np.ndarray, wanted: set[int], progress: bool
                 ) -> dict[int, list[int]]:
    """Model class index -> indices of images with at least one box of that class."""
    label_arrays = getattr(dataset, "box_label_arrays", None)
    if label_arrays is None or len(label_arrays) != len(dataset):
        logger.info("dataset has no box_label_arrays; reading every item to find the boxed images")
        label_arrays = [np.asarray(dataset[i]["box_labels"]).reshape(-1)
                        for i in tqdm(range(len(dataset)), desc="finding boxes", disable=not progress)]
    pairs: dict[int, list[int]] = {}
    for i, labs in enumerate(label_arrays):
        labs = np.asarray(labs, dtype=np.int64).reshape(-1)
        for c in sorted(set(to_model[labs].tolist()) if len(labs) else ()):
            if c in wanted:
                pairs.setdefault(c, []).append(i)
    return pairs


def _score(A: np.ndarray, M: np.ndarray, flat: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-pair iobb / ior / iou / pointing of maps (..., H, W) against masks (..., H, W); pairs whose
    map is flat (``flat`` (...,) True) are scored as the uniform map."""
    s = soft_scores(A, M)
    out = {k: s[k] for k in ("iobb", "ior", "iou")}
    out["pointing"] = pointing_game(A, M)
    if flat is not None and flat.any():
        uni = _uniform_scores(M)
        for k in out:
            out[k] = np.where(flat, uni[k], out[k])
    return out


def _noise(seed: int, cls: int, image: int, stream: int, draws: int, size: tuple[int, ...]
           ) -> torch.Tensor:
    """(draws, *size) uniform noise of one (image, class) pair and stream, independent of batching
    and order."""
    key = np.random.SeedSequence([int(seed), int(cls), int(image), int(stream)]).generate_state(1)[0]
    return torch.rand(draws, *size, generator=torch.Generator().manual_seed(int(key)))


def _uniform_scores(M: np.ndarray) -> dict[str, np.ndarray]:
    area = np.asarray(M, np.float64).mean((-2, -1))                         # (...,) box share
    return {"iobb": np.ones_like(area), "ior": area, "iou": area, "pointing": area}


def localization_vs_chance(model: nn.Module, dataset, method: str = "cam", *,
                           classes: Sequence[str] | None = None, n_random: int = 8, seed: int = 0,
                           centre_sigma: float = 0.25, batch_size: int = 32, layer: str | None = None,
                           min_images: int = 1, baselines: Sequence[str] = BASELINES, progress: bool = True,
                           flat: str = "uniform", class_map: dict[str, str] | None = None,
                           **method_params: Any) -> pd.DataFrame:
    """Per-class localisation of an attention method against random, uniform and centre-prior maps.

    Only images with at least one box of a class take part for that class; the map requested for an
    image is the one of that class. Scores are per (image, class) pair, then averaged per class.
    Memory is one batch of maps at a time plus a few numbers per pair.

    Args:
        model: classifier returning logits, with ``class_names`` (else the dataset's ``classes`` are
            taken to be its outputs, in order) and whatever ``method`` needs (e.g. ``feature_layer``
            and a linear ``head`` for ``cam``).
        dataset: indexable data set of dicts with ``image`` (C, S, S), ``boxes`` (K, 4) ``xyxy`` in
            S-pixels and ``box_labels`` (K,) indices into ``dataset.classes``, e.g.
            :class:`training.data.dataset.ManifestDataset` (whose ``box_label_arrays`` let the boxed
            images be found without decoding any image).
        method: one of :func:`interpret.attention.list_methods`.
        classes: class names to evaluate; default every model class with a box in ``dataset``.
        n_random: random maps (and shuffles of the method's map) per (image, class) pair (>= 1).
        seed: seed of the random maps (the table is deterministic given model, data and seed).
        centre_sigma: standard deviation of the centre prior as a fraction of the image side.
        batch_size: images per attention-map call.
        layer: layer to explain (layer methods); default ``model.feature_layer``.
        min_images: classes with fewer boxed images are reported but left out of the ``"mean"`` row.
        baselines: the reference maps to score, a subset of :data:`BASELINES` (``()``: the method's
            own scores only, e.g. when the chance levels are not wanted).
        progress: tqdm bar over batches.
        flat: ``"uniform"`` (default): a map with no spatial preference is scored as the uniform map;
            ``"as_is"``: as the all-zero map it is (IoBB 0, IoR 0; the imbalance study's authors).
        class_map: data class name -> model class name for the boxes (default: the same name), e.g.
            every finding -> ``"Abnormal"`` for a binary classifier.
        **method_params: passed to :func:`interpret.attention.get_method` (e.g. ``n_steps``).

    Returns:
        DataFrame indexed by ``class`` (model class order) with ``n_images`` (boxed images of the
        class), ``n_flat`` (method maps with no spatial preference, scored as uniform or as zeros: ``flat``), the method's
        ``iobb, ior, iou, pointing`` and the same four with suffixes ``_random``, ``_shuffled``,
        ``_uniform`` and ``_centre`` (those of ``baselines``); a last row ``"mean"`` averages the class rows with ``n_images >= min_images``
        (unweighted, so rare findings count as much as common ones; its ``n_images`` is their sum).
        ``attrs`` records method, n_random, seed, centre_sigma, baselines, image size and raw map size.

    Raises:
        ValueError: unknown method, class or baseline (valid ones listed), bad ``n_random`` /
            ``batch_size`` / ``centre_sigma``, a dataset without boxed images of the requested classes, or a dataset
            whose items lack ``image`` / ``boxes`` / ``box_labels``.

    Example:
        >>> t = localization_vs_chance(model, test_ds, "gradcam", n_random=4)   # doctest: +SKIP
        >>> float(t.loc["mean", "iobb"] - t.loc["mean", "iobb_random"])        # doctest: +SKIP
        0.21
    """
    if method not in list_methods():
        raise ValueError(f"unknown attention method {method!r}; valid: {list_methods()}")
    for name, value in (("n_random", n_random), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not centre_sigma > 0:
        raise ValueError(f"centre_sigma must be > 0, got {centre_sigma!r}")
    if flat not in FLAT_SCORING:
        raise ValueError(f"unknown flat scoring {flat!r}; valid: {list(FLAT_SCORING)}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown or isinstance(baselines, str):
        raise ValueError(f"unknown baselines {unknown or baselines!r}; valid: {list(BASELINES)}")
    baselines = tuple(b for b in BASELINES if b in baselines)
    model_classes = _model_classes(model, dataset)
    data_classes = [str(c) for c in getattr(dataset, "classes", model_classes)]
    index = {c: i for i, c in enumerate(model_classes)}
    # dataset class index -> model class index (-1: the model has no such output)
    class_map = class_map or {}
    to_model = np.array([index.get(class_map.get(c, c), -1) for c in data_classes] + [-1], dtype=np.int64)
    if classes is None:
        wanted = set(range(len(model_classes)))
    else:
        bad = [c for c in classes if c not in index]
        if bad:
            raise ValueError(f"unknown classes {bad}; the model's classes: {model_classes}")
        wanted = {index[c] for c in classes}
    pairs = _boxed_pairs(dataset, to_model, wanted, progress)
    if not pairs:
        raise ValueError(f"no image of the dataset has a box of the requested classes "
                         f"{sorted(model_classes[c] for c in wanted)}")

    explainer = get_method(method, model, layer, **method_params)
    n_batches = sum(math.ceil(len(v) / batch_size) for v in pairs.values())
    bar = tqdm(total=n_batches, desc=f"localisation vs chance ({method})", disable=not progress)
    rows: list[dict[str, Any]] = []
    size = raw_size = None
    prior = None
    try:
        for c in sorted(pairs):
            scores: dict[str, list[np.ndarray]] = {}
            n_flat = 0
            for start in range(0, len(pairs[c]), batch_size):
                items = [dataset[i] for i in pairs[c][start:start + batch_size]]
                try:
                    images = torch.stack([it["image"] for it in items]).float()   # (B, C, S, S)
                    boxes = [np.asarray(it["boxes"], np.float32).reshape(-1, 4) for it in items]
                    labs = [to_model[np.asarray(it["box_labels"], np.int64).reshape(-1)]
                            for it in items]
                except KeyError as e:
                    raise ValueError(f"dataset items need 'image', 'boxes' and 'box_labels'; "
                                     f"missing {e}") from None
                B, H, W = len(items), images.shape[-2], images.shape[-1]
                targets = torch.full((B, 1), c, dtype=torch.long)
                maps, raw = explainer(images, targets, return_raw=True)       # (B, 1, H, W), (B, 1, h, w)
                A = maps[:, 0].float().cpu().numpy()                            # (B, H, W)
                M = masks_from_boxes(boxes, labs, targets.numpy(), (H, W))[:, 0]   # (B, H, W)
                size, raw_size = (H, W), tuple(raw.shape[-2:])
                flat_maps = A.reshape(B, -1).max(-1) <= 0                       # no spatial preference
                n_flat += int(flat_maps.sum())
                parts = {"": _score(A, M, flat_maps if flat == "uniform" else None)}
                if "uniform" in baselines:
                    parts["_uniform"] = _uniform_scores(M)
                if "centre" in baselines:
                    if prior is None or tuple(prior.shape) != (H, W):
                        prior = centre_prior((H, W), centre_sigma).numpy()
                    parts["_centre"] = _score(np.broadcast_to(prior, M.shape), M)
                idx = pairs[c][start:start + B]
                MD = np.broadcast_to(M, (n_random, *M.shape))                     # (D, B, H, W)
                if "random" in baselines:
                    noise = torch.stack([_noise(seed, c, i, 0, n_random, raw_size) for i in idx], 1)
                    R = minmax_normalize(upsample(noise, (H, W))).numpy()       # (D, B, H, W)
                    parts["_random"] = {k: v.mean(0) for k, v in _score(R, MD).items()}  # (B,) mean of draws
                if "shuffled" in baselines:
                    # the method's raw cells in random order: same value distribution, no location
                    cells = raw[:, 0].float().cpu().flatten(1)                  # (B, h*w)
                    order = torch.stack([_noise(seed, c, i, 1, n_random, (cells.shape[1],)).argsort(-1)
                                         for i in idx], 1)                      # (D, B, h*w)
                    shuf = cells.expand(n_random, -1, -1).gather(-1, order).view(n_random, B, *raw_size)
                    shuf = F.relu(shuf) if explainer.relu else shuf
                    R = minmax_normalize(upsample(shuf, (H, W))).numpy()        # (D, B, H, W)
                    rflat = R.reshape(n_random, B, -1).max(-1) <= 0
                    parts["_shuffled"] = {k: v.mean(0) for k, v in _score(R, MD, rflat).items()}
                for suffix, d in parts.items():
                    for k, v in d.items():
                        scores.setdefault(k + suffix, []).append(np.asarray(v, np.float64))
                bar.update()
            row: dict[str, Any] = {"class": model_classes[c], "n_images": len(pairs[c]),
                                   "n_flat": n_flat}
            row.update({k: float(np.nanmean(np.concatenate(v))) for k, v in scores.items()})
            rows.append(row)
    finally:
        bar.close()

    cols = ["n_images", "n_flat"] + [m + s for s in ("",) + tuple("_" + b for b in baselines)
                                     for m in METRICS]
    table = pd.DataFrame(rows).set_index("class")[cols]
    keep = table[table["n_images"] >= min_images]
    mean = {"n_images": int(keep["n_images"].sum()), "n_flat": int(keep["n_flat"].sum()),
            **{k: float(keep[k].mean()) if len(keep) else float("nan") for k in cols[2:]}}
    table.loc["mean"] = pd.Series(mean)
    table[["n_images", "n_flat"]] = table[["n_images", "n_flat"]].astype(int)
    table.attrs.update({"method": method, "n_random": int(n_random), "seed": int(seed),
                        "centre_sigma": float(centre_sigma), "baselines": baselines, "image_size": size,
                        "raw_map_size": raw_size, "min_images": int(min_images), "flat": flat,
                        "relu": bool(getattr(explainer, "relu", False))})
    return table


class _Selected(Dataset):
    """The items ``indices`` of ``dataset``, keeping its ``classes`` and ``box_label_arrays``."""

    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.classes = list(getattr(dataset, "classes", []))
        arrays = getattr(dataset, "box_label_arrays", None)
        if arrays is not None:
            self.box_label_arrays = [arrays[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[self.indices[i]]


def interpret_table(model: nn.Module, dataset, indices: Sequence[int], q: float, batch_size: int = 32,
                    progress: bool = True, *, method: str = IMBALANCE_METHOD, protocol: str = "paper",
                    dissection_batch: int | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Grad-CAM localisation and dissection counts of a classifier on the boxed images ``indices``.

    The columns of Khakzar et al.'s Tables 1 and 2 (DESIGN.md, "Imbalance study"): per class the soft
    IoBB ``sum(A M) / sum(M)`` and soft IoR ``sum(A M) / sum(A)`` of the class's map ``A`` against
    the union ``M`` of its boxes, averaged over the images with a box of that class (the method scores
    of :func:`localization_vs_chance`), and the dissection of the feature layer against the boxes
    (:func:`interpret.dissection.dissect`: Disjoint = components overlapping a box of the class per
    image, Unique = (image, unit) pairs with such a component per image).

    The maps are the library's served maps of ``method`` (default :data:`IMBALANCE_METHOD`, Grad-CAM: ReLU,
    bilinear upsampling, min-max), as the authors' code computes them (Grad-CAM with ReLU, then min-max); a
    map left with no positive evidence by the ReLU is scored as the zeros it is (IoBB 0, IoR 0, as the
    authors' code does) and counted in ``n_flat``.

    A classifier with a single output (the ``binary`` task, e.g. ``["Abnormal"]``) is explained for that output
    against the union of every box of the image (the authors' NIH binary setting); its one row holds the
    overall dissection counts.

    Args:
        model: a trained classifier with ``class_names``, ``feature_layer`` and a linear ``head``
            (e.g. :class:`training.models.CXRClassifier`).
        dataset: data set with ``classes`` whose items have ``image`` (1, S, S), ``boxes`` (K, 4)
            ``xyxy`` in S-pixels and ``box_labels`` (K,), e.g.
            :class:`training.data.dataset.ManifestDataset`.
        indices: the images to use (those with boxes).
        q: dissection top fraction per unit (0.01 T-DenseNet, 0.04 ResNet50).
        batch_size: images per batch.
        progress: tqdm bars.
        method: attention method (:func:`interpret.attention.list_methods`); ``cam`` gives the same maps for a
            GAP + linear head.
        protocol: dissection protocol, ``"paper"`` or ``"authors_code"`` (see :mod:`interpret.dissection`).
        dissection_batch: images per quantile batch under ``"authors_code"`` (the authors: 128 T-DenseNet,
            64 ResNet50); default ``batch_size``.

    Returns:
        ``(table, overall)``: ``table`` indexed by the dataset's classes (or the single output's name) with
        :data:`INTERPRET_COLUMNS` (``n_boxed`` the images with a box of the class; NaN scores where it is 0),
        ``overall`` the dissection figures over the union of all boxes (``n_images``, ``disjoint``, ``unique``,
        ``units_detecting``) plus ``map_size`` (the dissected layer's h x w), ``image_size``, ``q``,
        ``protocol`` and ``method``.

    Raises:
        ValueError: no indices, or an unknown method / protocol.

    Example:
        >>> ds = ManifestDataset("phantom/manifest.parquet", image_size=64, split="test")   # doctest: +SKIP
        >>> boxed = [i for i, labels in enumerate(ds.box_label_arrays) if len(labels)]      # doctest: +SKIP
        >>> table, overall = interpret_table(model, ds, boxed, q=0.04)                      # doctest: +SKIP
    """
    from interpret.dissection import PROTOCOLS

    if not len(indices):
        raise ValueError("interpret_table needs at least one image with boxes")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown dissection protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    data = _Selected(dataset, indices)
    data_classes = [str(c) for c in dataset.classes]
    model_classes = _model_classes(model, dataset)
    single = len(model_classes) == 1 and model_classes[0] not in data_classes
    class_map = {c: model_classes[0] for c in data_classes} if single else {}
    index = {c: i for i, c in enumerate(model_classes)}
    to_model = np.array([index.get(class_map.get(c, c), -1) for c in data_classes] + [-1], dtype=np.int64)
    if _boxed_pairs(data, to_model, set(range(len(model_classes))), progress=False):
        loc = localization_vs_chance(model, data, method, batch_size=batch_size, baselines=(), progress=progress,
                                     flat="as_is", class_map=class_map)
        raw_size = loc.attrs.get("raw_map_size")
    else:
        loc = pd.DataFrame(columns=["n_images", "n_flat", "iobb", "ior"], dtype=float)
        raw_size = None
    loader = DataLoader(data, batch_size=dissection_batch or batch_size, shuffle=False, collate_fn=collate)
    res = dissect(model, loader, classes=data_classes, q=q, progress=progress, protocol=protocol)
    pc = res.per_class
    rows = []
    names = model_classes if single else data_classes
    for name in names:
        n = int(loc.at[name, "n_images"]) if name in index and name in loc.index else 0
        dis = res.overall if single else pc.loc[name]
        rows.append({"class": name, "n_boxed": n,
                     "n_flat": int(loc.at[name, "n_flat"]) if n else 0,
                     "iobb": float(loc.at[name, "iobb"]) if n else np.nan,
                     "ior": float(loc.at[name, "ior"]) if n else np.nan,
                     "disjoint": float(dis["disjoint"]), "unique": float(dis["unique"])})
    overall: dict[str, Any] = {k: float(res.overall[k]) for k in ("n_images", "disjoint", "unique", "units_detecting")}
    image_size = tuple(int(v) for v in data[0]["image"].shape[-2:])
    overall.update({"map_size": "x".join(str(int(v)) for v in res.params.get("map_size", raw_size or ())),
                    "image_size": "x".join(map(str, image_size)), "q": float(q), "protocol": protocol,
                    "method": method})
    return pd.DataFrame(rows).set_index("class")[list(INTERPRET_COLUMNS)], overall
