"""Where the interpretation library runs torch, and the one way its tensors become NumPy arrays.

The device choice itself is :func:`training.runtime.resolve_device` (CUDA when torch sees one, else the
CPU); this module adds what a configuration string needs around it: the accepted forms
(:data:`DEVICE_FORMS`), the ``CXR_TORCH_DEVICE`` override the service honours as well, a clear error for
anything else, and a one-line description for logs and records.

Methods of :mod:`interpret` run on the device their model lives on (:func:`model_device`): inputs are
moved there, tensors they create (baselines, masks, noise) are made there, and every tensor that becomes
a NumPy array goes through :func:`to_numpy` (``detach().cpu().numpy()``; a no-op copy-free ``cpu()`` on
the CPU). Random draws stay on the CPU generator and are moved afterwards, so results on the CPU are
bit-identical whatever the device support.

Example:
    >>> resolve_torch_device("cpu")
    device(type='cpu')
    >>> to_numpy(torch.ones(2)).tolist()
    [1.0, 1.0]
    >>> resolve_torch_device("tpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N (N = a CUDA device index)
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["DEVICE_ENV", "DEVICE_FORMS", "check_device_spec", "resolve_torch_device", "describe_device",
           "model_device", "to_numpy"]

#: Environment variable that overrides ``auto`` (the service reads the same one).
DEVICE_ENV = "CXR_TORCH_DEVICE"
#: The device strings a configuration accepts.
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")
_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str, what: str = "device") -> str:
    """``spec`` stripped when it is one of :data:`DEVICE_FORMS`; else ``ValueError`` naming the valid forms.

    Only the form is checked (not whether the machine has that device): see :func:`resolve_torch_device`.
    """
    text = str(spec).strip()
    if not _PATTERN.match(text):
        raise ValueError(f"unknown {what} {spec!r}; valid: auto, cpu, cuda, cuda:N (N = a CUDA device index)")
    return text


def resolve_torch_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device a configuration string names.

    Args:
        spec: ``auto`` (or None / ""): ``$CXR_TORCH_DEVICE`` when set, else
            :func:`training.runtime.resolve_device` (``cuda`` when ``torch.cuda.is_available()``, else
            ``cpu``); ``cpu``; ``cuda``; ``cuda:N``; or a :class:`torch.device`.

    Returns:
        The :class:`torch.device`.

    Raises:
        ValueError: an unknown form (the valid ones listed), also in ``$CXR_TORCH_DEVICE``; CUDA asked for
            on a machine where torch sees none, or a CUDA index beyond the devices present.
    """
    from training.runtime import resolve_device

    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_spec(spec or "auto")
    if text == "auto":
        env = os.environ.get(DEVICE_ENV, "").strip()
        text = check_device_spec(env, f"{DEVICE_ENV} value") if env else ""
    device = resolve_device(text or None)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} asked for, but torch sees no CUDA device here "
                             "(torch.cuda.is_available() is False); use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def describe_device(device: torch.device | str) -> dict[str, Any]:
    """``{"device": "cuda:0", "name": "NVIDIA ..."}`` (``name`` None on the CPU), for logs and records."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {"device": f"cuda:{index}", "name": torch.cuda.get_device_name(index)}
    return {"device": str(device), "name": None}


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else first buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor on any device as a NumPy array (``detach().cpu().numpy()``); arrays pass through.

    ``cpu()`` of a CPU tensor is the tensor itself, so on the CPU this is the old ``.numpy()`` (no copy)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
