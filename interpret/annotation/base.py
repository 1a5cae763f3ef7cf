"""Shared pieces of the concept annotation methods: input checks, the registry, the template-adjusted
mean-cosine score over per-unit representative images, and :func:`select_concepts`.

Every method has one signature (DESIGN.md)::

    method(activations (N, U), image_embeddings (N, d), concept_embeddings (M, d),
           template_embedding (d,) | None, **params) -> scores (U, M)

and is reached through :func:`interpret.annotation.concept_scores`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["Annotator", "Annotation", "RepresentativeAnnotator", "register", "get_annotator", "list_methods",
           "select_concepts", "score_margin", "template_scores", "constant_units", "as_tensor", "ON_NONPOSITIVE"]

_REGISTRY: dict[str, type["Annotator"]] = {}
ON_NONPOSITIVE = ("empty", "best")


def register(name: str) -> Callable[[type["Annotator"]], type["Annotator"]]:
    """Class decorator adding an :class:`Annotator` subclass to the registry under ``name``."""

    def deco(cls: type[Annotator]) -> type[Annotator]:
        if name in _REGISTRY:
            raise ValueError(f"annotation method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of the registered annotation methods, sorted."""
    return sorted(_REGISTRY)


def get_annotator(name: str, **params: Any) -> "Annotator":
    """Instantiate the method ``name`` with its parameters.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones) or an unknown parameter.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown annotation method {name!r}; valid: {', '.join(list_methods())}")
    return _REGISTRY[name](**params)


def as_tensor(x: Any, name: str, ndim: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x`` (tensor, ndarray or nested list) as a CPU-or-same-device tensor of ``dtype`` with ``ndim`` dims."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().to(dtype)
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


#: Units whose representatives are selected at once. Whole-width slices of the (N, U) activations are
#: contiguous: selecting 2,048 units at once took 0.14 s where 256-unit (strided) slices took 0.21 s (512 units x
#: 20,000 images, 2 cores; benchmarks/concept_bench.py). Memory: unit_chunk x N booleans (100 MB at 50,000 images).
UNIT_CHUNK = 2048


def _normalise(x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Rows to unit norm; rows already unit-norm (within ``tol``: the documented input) are not copied."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if bool(((norms - 1).abs() <= tol).all()):
        return x
    return x / norms.clamp(min=1e-12)


def constant_units(acts: torch.Tensor) -> torch.Tensor:
    """(U,) bool: units whose activation never varies over the probing images ``acts`` (N, U)."""
    return acts.amax(0) == acts.amin(0)


class Annotation(NamedTuple):
    """Scores of one method together with the evidence behind each unit's scores.

    Attributes:
        scores: (U, M) unit-concept scores.
        evidence: (U,) int64, how many probing images the unit's scores rest on (each method's docstring
            says which images: MAMMI's adaptive set, WWW's top-k, ...); 0 for a unit that never varies.
    """

    scores: torch.Tensor
    evidence: torch.Tensor


class Annotator:
    """Base class: validates inputs, then calls :meth:`compute`. Subclasses set ``params`` defaults in
    ``__init__`` and implement :meth:`compute` (or, for representative-set methods, only
    :meth:`RepresentativeAnnotator.representatives`).

    Attributes:
        name: registry name (set by :func:`register`).
        default_beta: the relative threshold :func:`interpret.annotation.annotate` uses by default.
        on_nonpositive: what :func:`select_concepts` does for a unit whose best score is <= 0.
        needs_embeddings: whether image/concept embeddings are used (``tsi`` does not).
    """

    name: str = ""
    default_beta: float = 0.95
    on_nonpositive: str = "empty"
    needs_embeddings: bool = True

    def __init__(self, unit_chunk: int = UNIT_CHUNK) -> None:
        if int(unit_chunk) < 1:
            raise ValueError(f"unit_chunk must be >= 1, got {unit_chunk}")
        self.unit_chunk = int(unit_chunk)

    def __call__(self, activations: Any, image_embeddings: Any, concept_embeddings: Any,
                 template_embedding: Any = None) -> torch.Tensor:
        """Scores (U, M); see :func:`interpret.annotation.concept_scores`."""
        return self.scores_and_evidence(activations, image_embeddings, concept_embeddings, template_embedding).scores

    def scores_and_evidence(self, activations: Any, image_embeddings: Any, concept_embeddings: Any,
                            template_embedding: Any = None) -> Annotation:
        """Scores (U, M) and evidence (U,) in one pass (inputs as for :meth:`__call__`)."""
        acts = as_tensor(activations, "activations", 2)
        if not self.needs_embeddings:
            m = None if concept_embeddings is None else as_tensor(concept_embeddings, "concept_embeddings", 2)
            return self.compute_with_evidence(acts, None, m, None)
        v = as_tensor(image_embeddings, "image_embeddings", 2)
        t = as_tensor(concept_embeddings, "concept_embeddings", 2)
        if v.shape[0] != acts.shape[0]:
            raise ValueError(f"activations have {acts.shape[0]} images but image_embeddings "
                             f"{v.shape[0]}; both must be (N, .) over the same probing images")
        if v.shape[1] != t.shape[1]:
            raise ValueError(f"image_embeddings dim {v.shape[1]} != concept_embeddings dim {t.shape[1]}")
        tem = None
        if template_embedding is not None:
            tem = as_tensor(template_embedding, "template_embedding").reshape(-1)
            if tem.shape[0] != v.shape[1]:
                raise ValueError(f"template_embedding dim {tem.shape[0]} != embedding dim {v.shape[1]}")
            tem = _normalise(tem.to(v.device))
        if acts.shape[0] == 0:
            raise ValueError("no probing images (N = 0)")
        return self.compute_with_evidence(acts.to(v.device), _normalise(v), _normalise(t.to(v.device)), tem)

    def compute(self, acts: torch.Tensor, v: torch.Tensor | None, t: torch.Tensor | None,
                tem: torch.Tensor | None) -> torch.Tensor:
        """Scores (U, M) from activations (N, U), unit-norm image (N, d) and concept (M, d) embeddings."""
        raise NotImplementedError

    def evidence(self, acts: torch.Tensor) -> torch.Tensor:
        """(U,) number of probing images each unit's scores rest on. Default: the top ``top_k`` images
        (``min(top_k, N)``) for a method with a ``top_k``, else all N images; 0 for a constant unit."""
        n = acts.shape[0]
        k = min(int(getattr(self, "top_k", n)), n)
        out = torch.full((acts.shape[1],), k, dtype=torch.long, device=acts.device)
        return out.masked_fill(constant_units(acts), 0)

    def compute_with_evidence(self, acts: torch.Tensor, v: torch.Tensor | None, t: torch.Tensor | None,
                              tem: torch.Tensor | None) -> Annotation:
        """:meth:`compute` and :meth:`evidence`; representative-set methods get both from one selection."""
        return Annotation(self.compute(acts, v, t, tem), self.evidence(acts))


def template_scores(sums: torch.Tensor, counts: torch.Tensor, t: torch.Tensor,
                    tem: torch.Tensor | None) -> torch.Tensor:
    """``s_ij = mean_o [cos(v_o, t_j) - cos(v_o, t_tem)]`` from per-unit sums of selected embeddings.

    Because the embeddings are unit-norm, the mean of cosines is the cosine with the mean:
    ``s_ij = (sum_o v_o / n_i) . (t_j - t_tem)``, so all units are scored with one matrix product.

    Args:
        sums: (U, d) sum of the selected image embeddings per unit.
        counts: (U,) number of selected images per unit (0 -> NaN row).
        t: (M, d) concept embeddings; tem: (d,) template embedding or None (no subtraction).

    Returns:
        (U, M) scores.
    """
    mean = sums / counts.clamp(min=1).to(sums.dtype)[:, None]  # (U, d)
    scores = mean @ t.T  # (U, M)
    if tem is not None:
        scores.sub_((mean @ tem)[:, None])  # in place: no second (U, M) matrix
    return scores.masked_fill_((counts == 0)[:, None], float("nan"))


class RepresentativeAnnotator(Annotator):
    """Methods that score a unit by the template-adjusted mean cosine over its representative images
    (MAMMI, WWW). Subclasses implement only :meth:`representatives`. The evidence of a unit is the size
    of its representative set (0 for a unit that never varies: it has no representatives)."""

    def representatives(self, acts: torch.Tensor) -> torch.Tensor:
        """Boolean selection (u, N) of representative images for a chunk of units ``acts`` (N, u)."""
        raise NotImplementedError

    def select(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`representatives` (u, N) and the constant units (u,) of a chunk (a method that needs
        the per-unit extrema anyway overrides this to compute them once)."""
        return self.representatives(acts), constant_units(acts)

    def evidence(self, acts: torch.Tensor) -> torch.Tensor:
        """(U,) representative-set sizes, without scoring."""
        counts = torch.zeros(acts.shape[1], dtype=torch.long, device=acts.device)
        for lo in range(0, acts.shape[1], self.unit_chunk):
            chunk = acts[:, lo:lo + self.unit_chunk]  # (N, u')
            counts[lo:lo + chunk.shape[1]] = (self.representatives(chunk) & ~constant_units(chunk)[:, None]).sum(1)
        return counts

    def compute(self, acts, v, t, tem):
        return self.compute_with_evidence(acts, v, t, tem).scores

    def compute_with_evidence(self, acts, v, t, tem):
        n, u = acts.shape
        sums = torch.zeros(u, v.shape[1], dtype=v.dtype, device=v.device)
        counts = torch.zeros(u, dtype=torch.long, device=v.device)
        for lo in range(0, u, self.unit_chunk):
            chunk = acts[:, lo:lo + self.unit_chunk]  # (N, u')
            hi = lo + chunk.shape[1]
            sel, const = self.select(chunk)  # (u', N) bool, (u',): a unit that never varies says nothing
            sums[lo:hi], counts[lo:hi] = masked_sum(sel, v)
            sums[lo:hi][const] = 0
            counts[lo:hi][const] = 0
        return Annotation(template_scores(sums, counts, t, tem), counts)


def masked_sum(sel: torch.Tensor, v: torch.Tensor, dense_above: float = 0.05,
               block_elems: int = 1 << 23) -> tuple[torch.Tensor, torch.Tensor]:
    """``sel.float() @ v`` and ``sel.sum(1)`` for a boolean selection (u, N) and embeddings (N, d).

    Sparse selections (the usual case: a few dozen representative images out of thousands) gather only
    the selected rows, ordered by unit, and sum each unit's segment (``torch.segment_reduce``), O(nnz * d)
    in blocks of ``block_elems`` floats; dense ones go through a plain matrix product. A selection that
    is the transpose of an (N, u) comparison (what the representative selections return) is scanned in
    its memory order. (``index_add_`` / ``scatter_add_`` were 20-70x slower with 2 threads on a loaded
    2-core machine: their parallel region waits for a descheduled thread.)
    """
    out = torch.zeros(sel.shape[0], v.shape[1], dtype=v.dtype, device=v.device)
    if sel.numel() == 0:
        return out, torch.zeros(sel.shape[0], dtype=torch.long, device=sel.device)
    if sel.T.is_contiguous():
        cols, rows = sel.T.nonzero(as_tuple=True)  # (nnz,) image, unit
    else:
        rows, cols = sel.nonzero(as_tuple=True)
    if rows.numel() > dense_above * sel.numel():
        return sel.to(v.dtype) @ v, sel.sum(1)
    order = torch.argsort(rows, stable=True)  # unit-major: each unit's images form one segment
    rows, cols = rows[order], cols[order]
    step = max(1, block_elems // max(1, v.shape[1]))
    for lo in range(0, rows.numel(), step):
        r = rows[lo:lo + step]
        u0, u1 = int(r[0]), int(r[-1]) + 1
        lengths = torch.bincount(r - u0, minlength=u1 - u0)  # (u1 - u0,) segment lengths
        out[u0:u1] += torch.segment_reduce(v[cols[lo:lo + step]], "sum", lengths=lengths)
    return out, torch.bincount(rows, minlength=sel.shape[0])


def select_concepts(scores: Any, beta: float = 0.95, on_nonpositive: str = "empty") -> list[list[int]]:
    """Per unit, the concepts whose score is above ``beta`` times the unit's best score, best first.

    MAMMI's relative threshold (DESIGN.md): concept ``j`` annotates unit ``i`` when
    ``s_ij > beta * max_j s_ij``. The best concept(s) are always part of a non-empty selection (with
    ``beta = 1`` the rule selects exactly the best concept and its ties, which is how ``tsi`` is read).

    The rule is meaningful only for a positive maximum: when ``max_j s_ij <= 0`` (no concept beats the
    base template for MAMMI/WWW; no concept above the IoU threshold for TSI) the unit gets an empty list
    with ``on_nonpositive="empty"`` (the default), or only its best concept(s) with ``"best"`` (what
    CLIP-Dissect does: its soft-WPMI scores are log-ratios whose sign carries no meaning). Rows that are
    entirely NaN (units that never vary over the probing set) are always empty; NaN entries are ignored.

    Args:
        scores: (U, M) tensor or array from :func:`interpret.annotation.concept_scores`.
        beta: relative threshold in [0, 1].
        on_nonpositive: ``"empty"`` or ``"best"``.

    Returns:
        ``U`` lists of concept indices, sorted by decreasing score (ties by increasing index).

    Raises:
        ValueError: ``scores`` not 2-D, ``beta`` outside [0, 1], unknown ``on_nonpositive``.

    Example:
        >>> select_concepts(torch.tensor([[0.2, 0.195, 0.1], [-0.1, -0.2, -0.3]]))
        [[0, 1], []]
    """
    s = as_tensor(scores, "scores", 2, dtype=torch.float64).cpu()
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if on_nonpositive not in ON_NONPOSITIVE:
        raise ValueError(f"on_nonpositive must be one of {ON_NONPOSITIVE}, got {on_nonpositive!r}")
    finite = torch.isfinite(s)
    filled = torch.where(finite, s, torch.full_like(s, -torch.inf))
    best = filled.amax(1, keepdim=True) if s.shape[1] else torch.full((s.shape[0], 1), -torch.inf)
    keep = finite & ((filled > beta * best) | (filled == best))
    positive = best[:, 0] > 0
    if on_nonpositive == "empty":
        keep &= positive[:, None]
    else:
        keep &= positive[:, None] | (filled == best)
    keep &= torch.isfinite(best)
    order = torch.argsort(-filled, dim=1, stable=True)  # (U, M) best first, ties by index
    kept_sorted = torch.gather(keep, 1, order)
    return [order[i][kept_sorted[i]].tolist() for i in range(s.shape[0])]


def score_margin(scores: Any) -> torch.Tensor:
    """Per unit, the best concept score minus the second best (NaN entries ignored).

    A small margin means the unit's best concept barely beats the runner-up, so the name is fragile.

    Args:
        scores: (U, M) tensor or array.

    Returns:
        (U,) float64 margins, >= 0; NaN for a unit with fewer than two finite scores.

    Example:
        >>> score_margin(torch.tensor([[0.25, 0.5, 0.125], [0.3, float("nan"), float("nan")]])).tolist()
        [0.25, nan]
    """
    s = as_tensor(scores, "scores", 2, dtype=torch.float64).cpu()
    if s.shape[1] < 2:
        return torch.full((s.shape[0],), float("nan"), dtype=torch.float64)
    finite = torch.isfinite(s)
    top2 = torch.where(finite, s, torch.full_like(s, -torch.inf)).topk(2, dim=1).values  # (U, 2)
    margin = top2[:, 0] - top2[:, 1]
    return torch.where(finite.sum(1) >= 2, margin, torch.full_like(margin, float("nan")))


def check_positive_int(value: Any, name: str) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_fraction(value: Any, name: str, lo_open: bool = True) -> float:
    v = float(value)
    if not ((0.0 < v if lo_open else 0.0 <= v) and v <= 1.0):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}0, 1], got {value!r}")
    return v


def names_or_indices(idx: Sequence[int], names: Sequence[str] | None) -> list:
    return [names[i] for i in idx] if names is not None else list(idx)
