"""ONNX export of a classifier with two outputs, ``logits`` (B, C) and ``features`` (B, K, h, w).

The graph takes ``images`` (B, 1, S, S) float32 in [0, 1] (normalisation is inside the model) with a
dynamic batch axis. After writing, the file is checked with ``onnx.checker`` and run with ONNX Runtime
on a random batch of 2; both outputs must match eager PyTorch within ``atol`` (default 1e-4).

We use the TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs ``onnxscript``,
which is not a dependency.

Example:
    >>> model = create_model("test_resnet", num_classes=2)            # doctest: +SKIP
    >>> export_onnx(model, "model.onnx", image_size=64)               # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["export_onnx", "OnnxMismatchError", "onnx_session", "INPUT_NAME", "OUTPUT_NAMES"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "features")


class OnnxMismatchError(ValueError):
    """ONNX Runtime outputs differ from eager PyTorch by more than the tolerance."""


class _LogitsAndFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_all(images)  # (B, C) logits, (B, K, h, w) features of one pass


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on CPU for ``path``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: int | None = None, opset: int = 17,
                check: bool = True, atol: float = 1e-4) -> Path:
    """Export ``model`` (a :class:`training.models.CXRClassifier`) to ONNX and verify it.

    Args:
        model: classifier with ``forward_all`` (logits and feature maps of one pass: a trained or an imported
            classifier, :mod:`training.imported`); exported from a CPU copy in
            eval mode (the caller's model is not changed).
        path: output ``.onnx`` file (parents created).
        image_size: side S of the example input (default: ``model.input_spec["size"]``). Batch is
            dynamic; the spatial size is fixed to S.
        opset: ONNX opset.
        check: run ``onnx.checker`` and compare ONNX Runtime with eager on a random batch of 2.
        atol: tolerance of that comparison, times the largest output magnitude when above 1 (plus 1e-4 relative).

    Returns:
        The written path.

    Raises:
        OnnxMismatchError: outputs differ by more than ``atol``.
        ValueError: bad ``image_size``.
    """
    size = int(image_size or model.input_spec["size"])
    if size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _LogitsAndFeatures(copy.deepcopy(model).cpu().float().eval()).eval()
    example = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
                          do_constant_folding=True)
    if check:
        import onnx

        onnx.checker.check_model(onnx.load(str(path)))
        probe = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref_logits, ref_feats = wrapper(probe)
        out_logits, out_feats = onnx_session(path).run(list(OUTPUT_NAMES), {INPUT_NAME: probe.numpy()})
        for name, ref, got in (("logits", ref_logits.numpy(), out_logits), ("features", ref_feats.numpy(), out_feats)):
            if ref.shape != got.shape:
                raise OnnxMismatchError(f"ONNX {name} shape {got.shape} != eager {ref.shape}")
            err = float(np.max(np.abs(ref - got))) if ref.size else 0.0
            # float32 rounding grows with the outputs' scale (an imported model fed [-1024, 1024] has feature maps
            # in the hundreds): the tolerance is atol times the largest magnitude, at least atol
            tol = atol * max(1.0, float(np.max(np.abs(ref)))) if ref.size else atol
            if not np.allclose(got, ref, atol=tol, rtol=1e-4):
                raise OnnxMismatchError(f"ONNX {name} differ from eager PyTorch by up to {err:.3g} (tolerance {tol:.3g})")
            log.info("ONNX %s max |diff| vs eager: %.2e", name, err)
    return path
