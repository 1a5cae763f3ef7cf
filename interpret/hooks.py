"""Capture named layers' outputs (and their gradients) with hooks that are always removed.

DenseNet-style models apply ``F.relu(features, inplace=True)`` after their last block. A forward hook
that keeps a *reference* to the block's output would see the tensor after that in-place ReLU on CPU
(a known bug in a popular library). :func:`capture` therefore clones every captured output inside the
hook, before anything downstream runs. Gradients are taken with ``Tensor.register_hook`` on the output
tensor itself (not ``register_full_backward_hook``, which refuses outputs that are later modified in
place); PyTorch calls such a hook with the gradient with respect to the value *before* any in-place
modification, i.e. the value we cloned.

Example:
    >>> import torch, torchvision
    >>> net = torchvision.models.resnet18(num_classes=3).eval()
    >>> with capture(net, ["layer4"], gradients=True) as cap:
    ...     net(torch.rand(2, 3, 64, 64))[:, 1].sum().backward()
    >>> cap.activations["layer4"].shape, cap.gradients["layer4"].shape
    (torch.Size([2, 512, 2, 2]), torch.Size([2, 512, 2, 2]))
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["Captured", "capture", "resolve_layer", "layer_names"]


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule of ``model`` (the valid ``layer`` arguments), root excluded."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """Look up a submodule by dotted name.

    Args:
        model: the network.
        name: dotted module name, e.g. ``"features.denseblock4"``.

    Returns:
        The submodule.

    Raises:
        ValueError: ``name`` is not a submodule of ``model``; the message lists the valid names.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer must be a non-empty dotted module name, got {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        valid = layer_names(model)
        shown = ", ".join(valid[:60]) + (f", ... ({len(valid)} in all)" if len(valid) > 60 else "")
        raise ValueError(f"unknown layer {name!r} for {type(model).__name__}; valid layers: "
                         f"{shown}") from None


def _first_tensor(output) -> torch.Tensor:
    """The tensor a layer produced (first element when it returns a tuple or list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot capture a layer output of type {type(output).__name__}; "
                    f"expected a Tensor or a tuple whose first element is one")


@dataclass
class Captured:
    """What :func:`capture` recorded during the last forward / backward passes.

    Attributes:
        activations: layer name -> detached clone of its output (last forward pass).
        gradients: layer name -> gradient of the backpropagated quantity with respect to that output
            (last backward pass through it; only when ``gradients=True``).
        leaves: layer name -> the leaf tensor (``requires_grad``) that replaced its output (last
            forward pass; only when ``cut=True``): pass it to ``torch.autograd.grad``.
    """

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.activations.clear()
        self.gradients.clear()
        self.leaves.clear()


@contextlib.contextmanager
def capture(model: nn.Module, layers: str | Sequence[str],
            gradients: bool = False, cut: bool = False) -> Iterator[Captured]:
    """Record the outputs (and optionally output gradients) of named layers.

    Every forward pass through a captured layer stores a detached *clone* of its output, made inside
    the hook, so later in-place operations cannot alter it. With ``gradients=True`` a tensor hook on
    the output records the gradient during any backward pass (``loss.backward()`` or
    ``torch.autograd.grad``) that flows through it; the output must be part of an autograd graph (the
    input or some parameter before the layer requires grad).

    Args:
        model: the network.
        layers: one dotted layer name or several.
        gradients: also record output gradients.
        cut: replace each layer's output, downstream, by a copy of a fresh leaf tensor that requires
            grad (``Captured.leaves``): a backward pass stops at the layer, and with frozen
            parameters and an input without grad no graph is built upstream of it at all (Grad-CAM
            needs the gradients at the layer only). The copy keeps in-place operations downstream
            (DenseNet's ReLU) off the leaf and the recorded activations.

    Yields:
        A :class:`Captured` filled as the model runs.

    Raises:
        ValueError: an unknown layer name (the message lists the valid ones), or no layers.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("capture needs at least one layer name")
    modules = {name: resolve_layer(model, name) for name in names}
    store = Captured()
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            out = _first_tensor(output)
            store.activations[name] = out.detach().clone()
            if cut:
                leaf = store.activations[name].requires_grad_(True)
                store.leaves[name] = leaf
                store.activations[name] = leaf.detach()
                out = leaf.clone()                                  # what the layers downstream see
                output = out if isinstance(output, torch.Tensor) else type(output)(
                    [out, *output[1:]])
            if gradients and out.requires_grad:
                def save_grad(grad: torch.Tensor) -> None:
                    store.gradients[name] = grad.detach().clone()
                out.register_hook(save_grad)
            return output if cut else None
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()
