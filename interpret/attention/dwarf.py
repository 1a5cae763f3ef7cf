"""DWARF maps (disease-weighted attention map refinement): the model's own expert-refined maps.

A DWARF model (:mod:`training.dwarf.model`) computes one map per disease itself: the head-averaged
cross-attention of the disease query over the ViT patch tokens, bilinearly upsampled to the input and
min-max normalised (``M_c``), then refined by that disease's expert head (``M'_c``, clamped to [0, 1]).
This method returns ``M'_c`` of the target classes as its raw maps; the shared pipeline
(:func:`~interpret.attention.base.finalize_maps`) then applies ReLU (the identity on [0, 1] maps),
upsampling (the identity: the maps are already at the input size) and min-max, exactly as the service
does with the registered pyfunc's ``maps`` for ``method=dwarf``. So the audited map is the served map.

No gradients, no hooks: one forward pass under ``torch.no_grad``.

Example:
    >>> from interpret.models import DwarfClassifierView
    >>> view = DwarfClassifierView(load_dwarf("checkpoint.pt"))                       # doctest: +SKIP
    >>> maps = attention_maps(view, images, targets=[[0, 2]] * len(images), method="dwarf")  # doctest: +SKIP
    >>> maps.shape                                                                      # doctest: +SKIP
    torch.Size([8, 2, 224, 224])
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interpret.attention.base import AttentionMethod, format_targets, model_state

__all__ = ["DwarfMaps"]


class DwarfMaps(AttentionMethod):
    """The expert-refined attention maps of a DWARF model.

    Args:
        model: a :class:`interpret.models.DwarfClassifierView` or a bare
            :class:`training.dwarf.model.DwarfModel` (wrapped in a view).
        layer: ignored (the maps are the model's output).
        relu: as every method (default :data:`~interpret.attention.base.SERVED_RELU`; the identity on
            DWARF's [0, 1] maps either way).

    Raises:
        ValueError: ``model`` is not a DWARF model (a classifier: use ``cam``, ``gradcam``, ...).
    """

    name = "dwarf"
    uses_layer = False

    def __init__(self, model: nn.Module, layer: str | None = None, relu: bool | None = None):
        from interpret.models import as_dwarf_view

        super().__init__(as_dwarf_view(model), layer=layer, relu=relu)

    def raw(self, images: torch.Tensor, targets: Any) -> torch.Tensor:
        """Refined maps of the targets: (B, T, S, S) in [0, 1], at the input size (before the pipeline)."""
        images = self._images(images)
        with model_state(self.model), torch.no_grad():
            maps = self.model.maps(images)                                          # (B, C, S, S)
        tgt = format_targets(targets, images.shape[0], maps.shape[1]).to(maps.device)  # (B, T)
        index = tgt[:, :, None, None].expand(-1, -1, *maps.shape[-2:])              # (B, T, S, S)
        return maps.gather(1, index)                                                # (B, T, S, S)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
