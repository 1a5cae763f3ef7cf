"""Adapters that let the library treat other model families like a classifier.

:class:`DwarfClassifierView` wraps a :class:`training.dwarf.model.DwarfModel` (whose ``forward`` returns a
:class:`~training.dwarf.model.DwarfOutput`) so that code written for classifiers (``model(x) -> logits``:
performance, deletion/insertion faithfulness, the parameter-randomisation sanity test) runs on it
unchanged, while its attention maps come from the model itself through ``method="dwarf"``
(:mod:`interpret.attention.dwarf`): the expert-refined maps, exactly what the service serves.

What a DWARF model does *not* have: a GAP + linear head over a feature layer. ``feature_layer`` is
``None`` and classifier attention methods (``cam``, ``gradcam``, ...) refuse the view
(:func:`explained_with`), so dissection, concepts and unit importance do not apply.

Parameter randomisation (:mod:`interpret.sanity`): every name in ``view.randomisation_layers`` is a
submodule, so ``randomise_block_(view.get_submodule(name), seed)`` reaches every weight, the
classification head included (:class:`QueryHead`); pass the names as ``model_randomisation(view, ...,
method="dwarf", layers=view.map_randomisation_layers)`` (its own default looks for ``head`` and
``features``, which a DWARF model does not have; its method check must accept ``list_methods(model)``).

Example:
    >>> from training.dwarf.model import load_dwarf
    >>> view = DwarfClassifierView(load_dwarf("checkpoint.pt"))          # doctest: +SKIP
    >>> view(images).shape, view.maps(images).shape                      # doctest: +SKIP
    (torch.Size([8, 3]), torch.Size([8, 3, 224, 224]))
    >>> from interpret import attention_maps
    >>> attention_maps(view, images, targets=[0] * 8, method="dwarf")     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DwarfClassifierView", "QueryHead", "as_dwarf_view", "explained_with", "is_dwarf"]


class QueryHead(nn.Module):
    """DWARF's classification head as a module: every parameter that turns decoder outputs into logits.

    ``logit_c = <q_c, w_c> + b_c`` (one weight row per query) and, in the ``classify_from="map"`` design,
    ``+ <pool(M'_c) . I, v_c>`` (the image tokens pooled under the refined map, Algorithm 1 line 15).
    :class:`~training.dwarf.model.DwarfModel` keeps these as bare parameters (``cls_weight`` (C, D),
    ``cls_bias`` (C,), ``map_cls_weight`` (C, D) or None); this module holds *the same* ``nn.Parameter``
    objects (shared, not copied), so ``view.get_submodule("cls_head")`` names the whole head and
    :meth:`reset_parameters` re-initialises all of it in place (a randomisation test of the head that left
    ``v_c`` trained would leave half of the classifier intact). ``copy.deepcopy`` keeps the sharing
    (parameters are memoised).

    Args:
        weight: the model's ``cls_weight`` (C, D).
        bias: the model's ``cls_bias`` (C,).
        map_weight: the model's ``map_cls_weight`` (C, D), or None (the ``"query"`` design).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter, map_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.map_weight = map_weight

    def reset_parameters(self) -> None:
        """DWARF's own initialisation: ``w, v ~ N(0, 1/D)``, ``b = 0`` (in place)."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.weight.shape[-1] ** -0.5)
            self.bias.zero_()
            if self.map_weight is not None:
                self.map_weight.normal_(0.0, self.map_weight.shape[-1] ** -0.5)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """``queries`` (B, C, D) decoder outputs -> the query-token term of the logits (B, C).

        The map-pooled term (``map_weight``) needs the refined maps and the image tokens; it is added in
        :meth:`training.dwarf.model.DwarfModel.forward`.
        """
        return (queries * self.weight).sum(-1) + self.bias


class DwarfClassifierView(nn.Module):
    """A DWARF model seen as a classifier: ``forward(x) -> logits (B, C)``, ``maps(x) -> refined maps``.

    The wrapped model is the submodule ``dwarf`` (so ``copy.deepcopy``, ``.to()``, ``.eval()``,
    ``parameters()`` and :func:`interpret.sanity.randomise_block_` reach every weight); its classification head is also
    named ``cls_head`` (:class:`QueryHead`, sharing the parameters: the query-token weights and bias and,
    in the ``classify_from="map"`` design, the map-pooled weights ``map_cls_weight``). Metadata (``class_names``,
    ``thresholds``, ``input_spec``) is read from, and written to, the wrapped model.

    Attributes:
        kind: ``"dwarf"`` (classifiers have no ``kind``; test with :func:`is_dwarf`).
        arch: ``"dwarf"``.
        feature_layer: ``None``: no GAP + linear feature layer (no CAM, dissection, concepts, units).
        attention_methods: ``("dwarf",)``: the only :func:`interpret.attention_maps` method for it.
        randomisation_layers: dotted block names (``get_submodule``; the ``layers`` of
            :func:`interpret.sanity.model_randomisation`) from the output down, for a cascading parameter-randomisation test: experts, classification head,
            final decoder norm, decoder layers (last first), memory then query projection, ViT blocks
            (last first), ViT patch embedding.
        logit_only_layers: the blocks among ``randomisation_layers`` that the maps do not depend on by
            construction (the maps are cross-attention weights, computed before the head): randomising
            one of them alone changes the logits and leaves the maps exactly as they were (in the
            ``independent`` mode they are expected among the unchanged layers; ``cascading`` steps
            include the experts randomised before them).
        map_randomisation_layers: ``randomisation_layers`` without ``logit_only_layers``: the blocks the
            maps depend on, output down (what a randomisation test *of the maps* should step through).

    Args:
        dwarf: a :class:`training.dwarf.model.DwarfModel` (e.g. from :func:`training.dwarf.load_dwarf`).

    Raises:
        ValueError: ``dwarf`` is not a DWARF model.
    """

    kind = "dwarf"
    arch = "dwarf"
    feature_layer = None
    attention_methods = ("dwarf",)

    def __init__(self, dwarf: nn.Module) -> None:
        super().__init__()
        from training.dwarf.model import DwarfModel

        if not isinstance(dwarf, DwarfModel):
            raise ValueError(f"DwarfClassifierView wraps a training.dwarf.DwarfModel, got {type(dwarf).__name__}")
        self.dwarf = dwarf
        self.cls_head = QueryHead(dwarf.cls_weight, dwarf.cls_bias, getattr(dwarf, "map_cls_weight", None))
        blocks = ["dwarf.experts"] if dwarf.experts is not None else []
        blocks += ["cls_head", "dwarf.decoder.norm"]
        blocks += [f"dwarf.decoder.layers.{i}" for i in reversed(range(len(dwarf.decoder.layers)))]
        blocks += ["dwarf.memory_proj", "dwarf.query_proj"]
        visual = "dwarf.encoder.visual"
        blocks += [f"{visual}.transformer.resblocks.{i}"
                   for i in reversed(range(len(dwarf.encoder.visual.transformer.resblocks)))]
        blocks += [f"{visual}.conv1"]
        self.randomisation_layers: list[str] = blocks
        self.logit_only_layers: tuple[str, ...] = ("cls_head", "dwarf.decoder.norm")

    # ---- metadata of the wrapped model ----
    @property
    def class_names(self) -> list[str]:
        return self.dwarf.class_names

    @property
    def thresholds(self) -> list[float]:
        return self.dwarf.thresholds

    @thresholds.setter
    def thresholds(self, value: list[float]) -> None:
        self.dwarf.thresholds = list(value)

    @property
    def threshold_positives(self) -> list[int] | None:
        """Validation positives each threshold rests on (set by training / the loader; None if unknown)."""
        return getattr(self.dwarf, "threshold_positives", None)

    @threshold_positives.setter
    def threshold_positives(self, value: list[int] | None) -> None:
        self.dwarf.threshold_positives = None if value is None else [int(n) for n in value]

    @property
    def min_val_positives(self) -> int | None:
        """Fewest validation positives a threshold was chosen with (None if unknown)."""
        return getattr(self.dwarf, "min_val_positives", None)

    @min_val_positives.setter
    def min_val_positives(self, value: int | None) -> None:
        self.dwarf.min_val_positives = None if value is None else int(value)

    @property
    def map_randomisation_layers(self) -> list[str]:
        return [n for n in self.randomisation_layers if n not in self.logit_only_layers]

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.dwarf.input_spec

    @property
    def config(self):
        """The wrapped model's :class:`training.dwarf.model.DwarfConfig`."""
        return self.dwarf.config

    # ---- the classifier interface ----
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 1, S, S) float in [0, 1] -> logits (B, C) (one head per disease query)."""
        return self.dwarf(images).logits

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 1, S, S) in [0, 1] -> expert-refined maps (B, C, S, S) in [0, 1], at the input size.

        These are the maps the registered pyfunc returns (``maps``) and the service serves for
        ``method=dwarf``; gradients flow when enabled.
        """
        return self.dwarf(images).refined_maps

    def extra_repr(self) -> str:
        return f"classes={self.class_names}"


def is_dwarf(model: Any) -> bool:
    """True for a :class:`DwarfClassifierView` or a bare :class:`training.dwarf.model.DwarfModel`."""
    if isinstance(model, DwarfClassifierView):
        return True
    from training.dwarf.model import DwarfModel

    return isinstance(model, DwarfModel)


def as_dwarf_view(model: nn.Module) -> DwarfClassifierView:
    """``model`` as a :class:`DwarfClassifierView` (a bare ``DwarfModel`` is wrapped; a view is returned as is).

    Raises:
        ValueError: ``model`` is neither.
    """
    if isinstance(model, DwarfClassifierView):
        return model
    if is_dwarf(model):
        return DwarfClassifierView(model)
    raise ValueError(f"method 'dwarf' explains DWARF models (training.dwarf.DwarfModel or "
                     f"interpret.models.DwarfClassifierView); got {type(model).__name__}, a classifier: use "
                     f"one of 'cam', 'gradcam', 'gradcampp', 'integrated_gradients', 'smoothgrad'")


def explained_with(model: Any) -> tuple[str, ...] | None:
    """The only attention methods ``model`` accepts, or None for an ordinary classifier (any method)."""
    if is_dwarf(model):
        return tuple(getattr(model, "attention_methods", DwarfClassifierView.attention_methods))
    return None
