"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", NeurIPS, §3).

An explanation that is faithful to the model must change when the model's learnt parameters are
destroyed. The test re-initialises the parameters block by block and compares the maps of the
randomised model with the original model's maps for the same images and classes:

- ``mode="cascading"``: from the output down: step k has the top k blocks (head first) randomised;
- ``mode="independent"``: step k has block k alone randomised, every other block original.

The maps compared are the **served** maps of :func:`interpret.attention_maps` (ReLU -> bilinear
upsampling -> per-map min-max to [0, 1], see :data:`interpret.attention.SERVED_RELU`): what the
service shows and the audit scores is what is checked. Similarity: Spearman rank correlation of the
flattened maps (:func:`spearman`) and SSIM (:func:`ssim`, Wang et al. 2004).

Departures from the paper, stated:

- **Re-initialisation** uses each module's own ``reset_parameters()`` (PyTorch's default
  initialisation, e.g. Kaiming-uniform for convolutions and linear layers: the weights of a freshly
  built, untrained model), seeded per block, instead of the truncated normal of the paper. A module
  that owns parameters but has no ``reset_parameters`` gets each such parameter redrawn from a normal
  distribution with that parameter's own mean and standard deviation. Draws happen on the CPU under
  ``torch.random.fork_rng`` (the global RNG state is left unchanged; the same seed gives the same
  weights on every device), with the seed ``seed`` combined with the block's name, so a block gets
  the same random weights in both modes.
- **BatchNorm** layers inside a randomised block are reset too: weight 1, bias 0 and running mean 0,
  running variance 1 (``reset_parameters`` resets the running statistics). The statistics were
  estimated for the trained weights below them and are part of what was learnt; the maps are computed
  in eval mode, so no statistic is re-estimated on the probe images.
- **Absolute-value variant**: Adebayo et al. report rank correlations with and without the absolute
  value of the map. The served maps are non-negative (ReLU before min-max), so the two coincide here.
- HOG similarity (also in the paper) is not computed.
- A constant map (e.g. a randomised head whose CAM is negative everywhere, zero after ReLU) has no
  ranks: its Spearman correlation is NaN (kept in the table, left out of the means); SSIM is defined.

Example:
    >>> from training.models import create_model
    >>> model = create_model("test_resnet", classes=["Effusion", "Mass"], image_size=64)
    >>> table = model_randomisation(model, torch.rand(4, 1, 64, 64), [0, 1, 0, 1],
    ...                             method=["cam", "gradcam"])    # doctest: +SKIP
    >>> sanity_summary(table)["passed"]                             # doctest: +SKIP
    True
"""
from __future__ import annotations

import copy
import logging
import math
import zlib
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from interpret.attention import attention_maps, format_targets, list_methods
from interpret.devices import to_numpy
from interpret.hooks import resolve_layer
from interpret.stats import mean_ci

logger = logging.getLogger(__name__)

__all__ = ["MODES", "DEFAULT_MAX_SPEARMAN", "DEFAULT_MAX_SSIM", "randomisation_layers", "block_seed",
           "randomise_block_", "model_randomisation", "ssim", "spearman", "sanity_summary"]

#: Randomisation orders: top blocks cumulatively, or one block at a time.
MODES = ("cascading", "independent")

#: A step "changed the maps" when the mean Spearman correlation between original and randomised maps is
#: below this. 0.5: the threshold is on a rank correlation of whole maps, so it leaves room for what
#: survives any randomisation of the weights above a layer (the image's own layout: bright, large
#: structures such as the mediastinum pass through random convolutions too; untrained tiny networks
#: give 0.0-0.4 after the head alone, see tests), while a map that keeps more than half its rank order
#: after the parameters it claims to explain are gone is not explaining them.
DEFAULT_MAX_SPEARMAN = 0.5
#: ... and the mean SSIM is below this. 0.6: SSIM of two unrelated smooth [0, 1] maps is not near 0
#: (upsampled low-resolution maps are locally smooth, and the luminance and contrast terms are shared),
#: so a stricter bound would fail maps that did change; 1.0 is the identical map.
DEFAULT_MAX_SSIM = 0.6


# ---------------------------------------------------------------------------------------------- layers
def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomisation_layers(model: nn.Module) -> list[str]:
    """Blocks to randomise, from the output (head) down to the input.

    The blocks are the head (``model.head``, when it holds parameters) and the top-level children of
    ``model.features`` that hold parameters, last first: e.g. ``["head", "features.layer4", ...,
    "features.bn1", "features.conv1"]`` for a ResNet. A model without ``features`` uses its own
    top-level children with parameters (the head first when it has one).

    Args:
        model: a classifier (see :func:`training.models.create_model`).

    Returns:
        Dotted module names, output first.

    Raises:
        ValueError: the model has no module holding parameters.
    """
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module):
        blocks = [f"features.{n}" for n, m in features.named_children() if _has_params(m)]
    else:
        blocks = [n for n, m in model.named_children() if n != "head" and _has_params(m)]
    head = getattr(model, "head", None)
    names = (["head"] if isinstance(head, nn.Module) and _has_params(head) else []) + blocks[::-1]
    if not names:
        raise ValueError(f"{type(model).__name__} has no parameterised block to randomise (looked for "
                         f"'head' and the children of 'features')")
    return names


def block_seed(seed: int, name: str) -> int:
    """The seed a block ``name`` is re-initialised with in a test seeded ``seed`` (a function of both only, so a
    block gets the same random weights in every mode and in :func:`interpret.audit.checks.randomisation_examples`)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


@torch.no_grad()
def randomise_block_(block: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of ``block`` in place, reproducibly.

    Each submodule with ``reset_parameters`` is reset with it (BatchNorm: weight 1, bias 0, running
    statistics reset); parameters owned by a submodule without it are redrawn from a normal
    distribution with their own mean and standard deviation. Draws use the CPU generator seeded with
    ``seed`` inside ``torch.random.fork_rng`` (the global RNG state is restored).

    Args:
        block: the module to randomise (modified in place).
        seed: seed of the draws.

    Returns:
        ``block``.
    """
    for qualname, module in block.named_modules():
        own = list(module.parameters(recurse=False))
        has_reset = callable(getattr(module, "reset_parameters", None))
        if not own and not (has_reset and isinstance(module, nn.modules.batchnorm._NormBase)):
            continue
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(block_seed(seed, qualname))
            if has_reset:
                tensors = own + list(module.buffers(recurse=False))
                device = tensors[0].device if tensors else torch.device("cpu")
                module.to("cpu").reset_parameters()          # draws on the CPU generator
                module.to(device)
            else:
                for p in own:
                    std = float(p.std()) if p.numel() > 1 else 0.0
                    draw = torch.randn(p.shape, dtype=torch.float32) * (std or 0.01) + float(p.mean())
                    p.copy_(draw.to(p.device, p.dtype))
                logger.debug("%s has no reset_parameters; redrew %d parameter(s) from N(mean, std)",
                             type(module).__name__, len(own))
    return block


# ---------------------------------------------------------------------------------------------- similarity
def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"maps must have the same shape (..., H, W), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return a, b


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13) of pairs of maps, batched.

    Uniform ``win_size`` x ``win_size`` windows with the sample covariance (N / (N - 1)), K1 = 0.01,
    K2 = 0.03, mean over the windows that lie inside the map: the same figure as
    ``skimage.metrics.structural_similarity(a, b, win_size=7, data_range=1.0,
    gaussian_weights=False)`` (which crops ``(win_size - 1) // 2`` border pixels; tested equal).

    Args:
        a: (..., H, W) maps.
        b: (..., H, W) maps, same shape.
        data_range: range of the values (1.0 for the served [0, 1] maps).
        win_size: odd window side, at most min(H, W).

    Returns:
        (...,) float64 SSIM, 1 for identical maps.

    Raises:
        ValueError: shapes differ, a map smaller than the window, an even or too small ``win_size``,
            or a non-positive ``data_range``.
    """
    a, b = (t.double() for t in _pair(a, b))
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd int >= 3, got {win_size!r}")
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"maps of size {tuple(a.shape[-2:])} are smaller than win_size={win_size}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")
    lead = a.shape[:-2]
    x = a.reshape(-1, 1, *a.shape[-2:])                                  # (N, 1, H, W)
    y = b.reshape(-1, 1, *b.shape[-2:])
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)                     # (N, 5, H, W)
    mu = F.avg_pool2d(stack, win_size, stride=1)                          # (N, 5, H-w+1, W-w+1) means
    ux, uy, uxx, uyy, uxy = mu.unbind(1)
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((-2, -1)).reshape(lead)                                # (...,)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N, P) -> (N, P) float64 ranks 1..P along the last axis, ties given their average rank."""
    srt, order = x.sort(-1)                                               # (N, P)
    P = x.shape[-1]
    pos = torch.arange(P, device=x.device).expand_as(srt)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]                                # a tie group starts here
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]                                             # a tie group ends here
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(-1).values
    end = torch.where(last, pos, torch.full_like(pos, P)).flip(-1).cummin(-1).values.flip(-1)
    avg = (first + end).double() / 2 + 1                                  # (N, P) in sorted order
    return torch.empty_like(avg).scatter_(-1, order, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of pairs of flattened maps, batched (average ranks for ties).

    Equals ``scipy.stats.spearmanr(a.ravel(), b.ravel())`` per pair (tested). Adebayo et al. also
    use the absolute value of signed maps; served maps are non-negative, so it is the same here.

    Args:
        a: (..., H, W) maps.
        b: (..., H, W) maps, same shape.

    Returns:
        (...,) float64 correlations in [-1, 1]; NaN where either map is constant (no ranks).

    Raises:
        ValueError: shapes differ.
    """
    a, b = _pair(a, b)
    return _rank_correlation(_centred_ranks(a), _centred_ranks(b)).reshape(a.shape[:-2])


def _centred_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (N, H*W) average ranks minus their mean."""
    r = _average_ranks(maps.reshape(-1, maps.shape[-2] * maps.shape[-1]))  # (N, P)
    return r - r.mean(-1, keepdim=True)


def _rank_correlation(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of centred ranks (N, P) x (N, P) -> (N,), NaN where either is constant."""
    den = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()              # (N,)
    num = (ra * rb).sum(-1)
    rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, float("nan")))
    return rho.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- the test
def _maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str,
          batch_size: int, params: dict[str, Any]) -> torch.Tensor:
    # maps are computed on the model's device and kept on the CPU, one batch at a time
    out = [attention_maps(model, images[i:i + batch_size], targets[i:i + batch_size], method=method,
                          **params).detach().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)                                                 # (B, T, H, W)


def model_randomisation(model: nn.Module, images: torch.Tensor, targets: Any,
                        method: str | Sequence[str] = "cam", *, mode: str | Sequence[str] = "cascading",
                        layers: Sequence[str] | None = None, seed: int = 0, batch_size: int = 32,
                        **params: Any) -> pd.DataFrame:
    """Model-parameter randomisation test (Adebayo et al. 2018, §3.1) of attention-map methods.

    The caller's model is never modified or even switched to eval mode: a deep copy is explained and
    randomised. Maps come from :func:`interpret.attention_maps` (the served maps) for the same images and
    targets before and after randomisation.

    Args:
        model: classifier (``forward(images) -> logits``), e.g. from :func:`training.models.create_model`.
        images: (B, C, H, W) float images, as the model takes them ([0, 1] grey for this project's models).
        targets: class indices: an int, one per image (B,), or (B, T).
        method: an attention method of :func:`interpret.attention.list_methods`, or several.
        mode: ``"cascading"`` (top k blocks randomised at step k) or ``"independent"`` (block k alone),
            or both as a sequence.
        layers: dotted block names in randomisation order, output first; default
            :func:`randomisation_layers`.
        seed: seed of the re-initialisation (same seed -> same table).
        batch_size: images per call of :func:`interpret.attention_maps`.
        **params: passed to the attention method (e.g. ``layer=`` for a layer method).

    Returns:
        A DataFrame with one row per method, mode, step, image and target: ``method`` str, ``mode`` str,
        ``step`` int (1 = first block randomised), ``layer`` str (the block randomised at this step;
        in cascading mode every block of the earlier steps is randomised too), ``image_index`` int,
        ``target`` int (class index), ``spearman`` float (NaN for a constant map), ``ssim`` float.

    Raises:
        ValueError: an unknown method, mode or layer (the valid ones listed), images that are not
            (B, C, H, W) float, bad targets, or ``batch_size`` < 1.
    """
    methods = [method] if isinstance(method, str) else list(method)
    modes = [mode] if isinstance(mode, str) else list(mode)
    for m in methods:
        if m not in list_methods(model):
            raise ValueError(f"unknown attention method {m!r} for {type(model).__name__}; valid: "
                             f"{list_methods(model)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown randomisation mode {m!r}; valid: {list(MODES)}")
    if not methods or not modes:
        raise ValueError(f"give at least one method and one mode, got method={method!r}, mode={mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a (B, C, H, W) float tensor, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    reference = copy.deepcopy(model)
    names = list(layers) if layers is not None else randomisation_layers(reference)
    if not names:
        raise ValueError("layers is empty; give at least one block to randomise")
    for name in names:
        resolve_layer(reference, name)                                   # unknown names listed
    B = images.shape[0]
    tgt = format_targets(targets, B).to(images.device)                    # (B, T)
    T = tgt.shape[1]
    image_index = np.repeat(np.arange(B), T)                              # (B*T,) row order b-major
    target = to_numpy(tgt).reshape(-1)
    logger.info("model randomisation: methods=%s modes=%s blocks=%s images=%d targets/image=%d seed=%d",
                methods, modes, names, B, T, seed)

    frames = []
    for meth in methods:
        original = _maps(reference, images, tgt, meth, batch_size, params)  # (B, T, H, W)
        original_ranks = _centred_ranks(original)                         # (B*T, H*W), ranked once
        for md in modes:
            work = copy.deepcopy(reference) if md == "cascading" else None
            for step, name in enumerate(names, start=1):
                if md == "independent":
                    work = copy.deepcopy(reference)
                randomise_block_(work.get_submodule(name), block_seed(seed, name))
                randomised = _maps(work, images, tgt, meth, batch_size, params)    # (B, T, H, W)
                frames.append(pd.DataFrame({
                    "method": meth, "mode": md, "step": step, "layer": name,
                    "image_index": image_index, "target": target,
                    "spearman": to_numpy(_rank_correlation(original_ranks, _centred_ranks(randomised))),
                    "ssim": to_numpy(ssim(original, randomised).reshape(-1)),
                }))
    table = pd.concat(frames, ignore_index=True)
    return table.astype({"step": "int64", "image_index": "int64", "target": "int64"})


def sanity_summary(table: pd.DataFrame, max_spearman: float = DEFAULT_MAX_SPEARMAN,
                   max_ssim: float = DEFAULT_MAX_SSIM, n_resamples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> dict[str, Any]:
    """Per method and mode: per-step mean Spearman and SSIM with bootstrap CIs, and a verdict.

    The unit of resampling is the image: each image's values are first averaged over its targets (the
    maps of one image are not independent), then :func:`interpret.stats.mean_ci` runs over images.

    A step *changed the maps* when its mean Spearman is below ``max_spearman`` (or undefined: every
    randomised map constant) **and** its mean SSIM is below ``max_ssim``. A method/mode **passed** when
    every step changed the maps: from the head alone down to all blocks in cascading mode (the
    paper's test), and each block alone in independent mode. The top-level ``passed`` is True when
    every method passed in cascading mode (the independent mode is reported, not gated: with skip
    connections one block alone can leave the maps close to the original, as a residual block does), and
    None when the table has no cascading rows. A step whose randomised maps are all constant counts as
    changed; ``n_undefined_spearman`` shows it (if the *original* maps are constant the test says
    nothing, and the SSIM carries the verdict). Thresholds: see :data:`DEFAULT_MAX_SPEARMAN` and
    :data:`DEFAULT_MAX_SSIM` for why.

    Args:
        table: the output of :func:`model_randomisation`.
        max_spearman: mean rank correlation under which a step changed the maps.
        max_ssim: mean SSIM under which a step changed the maps.
        n_resamples: bootstrap resamples of each CI.
        confidence: CI coverage.
        seed: bootstrap seed.

    Returns:
        ``{"thresholds": {...}, "passed": bool | None, "methods": {method: {mode: {"passed": bool,
        "failed_layers": [str], "steps": [{"step", "layer", "n_images", "n_undefined_spearman",
        "spearman": CI dict, "ssim": CI dict, "changed": bool}]}}}}``: JSON-ready (``None`` for NaN).

    Raises:
        ValueError: ``table`` lacks the columns of :func:`model_randomisation`, or a threshold is
            outside (0, 1].
    """
    needed = ["method", "mode", "step", "layer", "image_index", "target", "spearman", "ssim"]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; expected the output of model_randomisation "
                         f"({needed})")
    for name, value in (("max_spearman", max_spearman), ("max_ssim", max_ssim)):
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    methods: dict[str, dict[str, Any]] = {}
    for (meth, md), rows in table.groupby(["method", "mode"], sort=False):
        steps = []
        for (step, layer), g in rows.groupby(["step", "layer"], sort=True):
            per_image = g.groupby("image_index")[["spearman", "ssim"]].mean()  # NaN only if all NaN
            rho = mean_ci(per_image["spearman"].to_numpy(), n_resamples, confidence, seed)
            sim = mean_ci(per_image["ssim"].to_numpy(), n_resamples, confidence, seed)
            rho_ok = math.isnan(rho.estimate) or rho.estimate < max_spearman
            changed = bool(rho_ok and sim.estimate < max_ssim)
            steps.append({"step": int(step), "layer": str(layer), "n_images": int(len(per_image)),
                          "n_undefined_spearman": int(g["spearman"].isna().sum()),
                          "spearman": rho.to_dict(), "ssim": sim.to_dict(), "changed": changed})
        methods.setdefault(str(meth), {})[str(md)] = {
            "passed": all(s["changed"] for s in steps),
            "failed_layers": [s["layer"] for s in steps if not s["changed"]],
            "steps": steps,
        }
    cascading = [m["cascading"]["passed"] for m in methods.values() if "cascading" in m]
    return {
        "thresholds": {"max_spearman": float(max_spearman), "max_ssim": float(max_ssim),
                       "rule": "every step: mean Spearman < max_spearman (or undefined) and mean "
                               "SSIM < max_ssim"},
        "passed": all(cascading) if cascading else None,
        "methods": methods,
    }
