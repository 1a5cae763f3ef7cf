"""Bring your own model: wrap an existing chest X-ray classifier in this project's classifier contract.

An imported model is an :class:`ImportedClassifier`: it takes what every model here takes (``(B, 1, S, S)``
float32 in **[0, 1]**) and does the model's own input handling inside, in a buffer-backed first layer
(:class:`InputAdapter`): scale [0, 1] to the model's range (TorchXRayVision: [-1024, 1024]), repeat the grey
channel to 3 where the model wants RGB, then its mean/std. It carries the metadata of
:class:`training.models.CXRClassifier` (``arch``, ``class_names``, ``thresholds`` (NaN = none),
``threshold_positives``, ``min_val_positives``, ``input_spec``, ``feature_layer``) and its methods
(``forward -> logits``, ``forward_features``, ``forward_all``), so ONNX export, the pyfunc, the service and the
audit treat it like a trained classifier.

Sources (:func:`import_model`; nothing is ever downloaded):

- ``xrv:<Class>``: a TorchXRayVision model class built with ``weights=None`` (``xrv:DenseNet``), its
  ``targets`` (18 by default) mapped to canonical NIH spellings, then a local state dict (optional: no file
  keeps the random initialisation, for tests);
- ``timm:<name>`` / ``torchvision:<name>``: an architecture built with no pretrained weights and the class
  count, then a local state dict (1- or 3-channel first layer);
- ``torchscript:<file>``: a TorchScript program whose top-level children run in sequence (checked); hooks
  cannot enter a ScriptModule, so its trunk (the children up to the last spatial map) is the feature layer and,
  its head being no ``nn.Linear`` module, it is explained with Grad-CAM;
- ``factory:<module>:<function>``: a Python factory returning an ``nn.Module``, with its keyword arguments
  (the module must be importable wherever the model is loaded again), then an optional state dict.

Feature layer (attention maps): found with one dry run, the last module whose output is a spatial map
``(B, K, h, w)`` with ``h * w > 1`` (the last spatial layer before pooling), or the last transformer block of a
ViT (tokens ``(B, N, D)``; class and register tokens dropped, patch tokens reshaped to the grid, see
``token_grid``). Overridable by name; an unknown name lists the candidates.

Head: a model whose logits are exactly an ``nn.Linear`` of the globally average-pooled feature maps (checked
numerically on a random batch at import) exposes it as ``head``, so CAM and unit contributions are exact
(``head_kind == "gap_linear"``). Any other head (a ViT's class token, a norm after pooling) has
``head is None`` and ``head_kind == "other"``: explain it with Grad-CAM.

Checkpoints: :func:`save_imported` / :func:`load_imported` (called by :func:`training.models.save_checkpoint`
and :func:`training.models.load_checkpoint`, which dispatch on the file's ``format``) store how to rebuild the
architecture (source, name, keyword arguments; a TorchScript program as bytes) and the state dict.

Example:
    >>> model = import_model("xrv:DenseNet", image_size=64,
    ...                      model_kwargs={"growth_rate": 8, "block_config": [1, 1], "num_init_features": 8})
    >>> model.class_names[:3], model.head_kind
    (['Atelectasis', 'Consolidation', 'Infiltration'], 'gap_linear')
    >>> model(torch.rand(2, 1, 64, 64)).shape
    torch.Size([2, 18])
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ImportedClassifier", "InputAdapter", "ImportError_", "import_model", "build_network", "SOURCES",
           "IMPORTED_FORMAT", "save_imported", "load_imported", "check_state_dict", "xrv_targets",
           "is_imported", "tokens_to_maps", "read_state_dict", "calibrate_thresholds"]

IMPORTED_FORMAT = "cxr-imported/1"
SOURCES = ("xrv", "timm", "torchvision", "torchscript", "factory")
OUTPUTS = ("logits", "probabilities")
_PROB_EPS = 1e-7


class ImportError_(ValueError):
    """A model that cannot be imported: the message names the bad value (and lists valid ones)."""


# ---- input ---------------------------------------------------------------------------------------
class InputAdapter(nn.Module):
    """[0, 1] grey images to the model's own input: ``((lo + (hi - lo) x) repeated to C channels - mean) / std``.

    Args:
        channels: the model's input channels (1 or 3).
        scale: ``(lo, hi)``: what 0 and 1 become (TorchXRayVision: ``(-1024, 1024)``; most models ``(0, 1)``).
        mean, std: one value, or one per channel, applied after scaling.

    Raises:
        ImportError_: channels not 1 or 3, ``hi <= lo``, a non-positive std or a mean/std of the wrong length.
    """

    def __init__(self, channels: int = 1, scale: Sequence[float] = (0.0, 1.0), mean: Sequence[float] | float = 0.0,
                 std: Sequence[float] | float = 1.0) -> None:
        super().__init__()
        channels = int(channels)
        if channels not in (1, 3):
            raise ImportError_(f"input channels must be 1 or 3 (a chest X-ray is grey), got {channels}")
        lo, hi = (float(v) for v in scale)
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
            raise ImportError_(f"input scale must be two finite numbers lo < hi, got {list(scale)}")
        mean_t, std_t = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in (mean, std))
        for name, t in (("mean", mean_t), ("std", std_t)):
            if t.numel() == 1:
                continue
            if t.numel() != channels:
                raise ImportError_(f"input {name} needs 1 or {channels} values (one per channel), got {t.tolist()}")
        if (std_t <= 0).any() or not torch.isfinite(std_t).all() or not torch.isfinite(mean_t).all():
            raise ImportError_(f"input std must be > 0 and mean/std finite, got mean {mean_t.tolist()}, "
                               f"std {std_t.tolist()}")
        self.channels = channels
        self.register_buffer("lo", torch.tensor(lo))
        self.register_buffer("hi", torch.tensor(hi))
        self.register_buffer("mean", mean_t.expand(channels).clone().view(1, channels, 1, 1))
        self.register_buffer("std", std_t.expand(channels).clone().view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lo + (self.hi - self.lo) * x                                   # (B, 1, S, S) in [lo, hi]
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)                             # (B, 3, S, S)
        return (x - self.mean) / self.std

    def spec(self) -> dict[str, Any]:
        return {"model_channels": self.channels, "scale": [float(self.lo), float(self.hi)],
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


# ---- the wrapper -----------------------------------------------------------------------------------
class _DenseNetForward(nn.Module):
    """torchvision / TorchXRayVision DenseNet run as ``features -> ReLU -> GAP -> classifier``.

    Their own ``forward`` applies ``F.relu(inplace=True)`` to the captured feature maps (STYLE.md, 3) and
    TorchXRayVision's may resize the input or apply operating-point sigmoids; this module computes the logits
    without either, with a non-in-place ReLU module as the feature layer.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.relu(self.net.features(x))                                 # (B, K, h, w)
        return self.net.classifier(feats.mean(dim=(2, 3)))                      # (B, C)


class _ScriptChain(nn.Module):
    """A TorchScript program split into ``trunk`` (its top-level children up to the feature layer) and
    ``rest`` (the others), run in sequence; a 4-D input to a ``Linear`` child is flattened first (the
    ``torch.flatten`` of a pooled map). Hooks cannot be put inside a ScriptModule: ``trunk`` is the hookable
    feature layer."""

    def __init__(self, program: nn.Module, split: int) -> None:
        super().__init__()
        children = list(program.named_children())
        self.trunk = nn.ModuleDict(children[:split])
        self.rest = nn.ModuleDict(children[split:])
        self.trunk_run = _Seq(self.trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Seq(self.rest)(self.trunk_run(x))


class _Seq(nn.Module):
    def __init__(self, mods: nn.ModuleDict) -> None:
        super().__init__()
        self._mods = [mods]  # not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mod in self._mods[0].values():
            if getattr(mod, "original_name", type(mod).__name__) == "Linear" and x.dim() == 4:
                x = torch.flatten(x, 1)
            x = mod(x)
        return x


class ImportedClassifier(nn.Module):
    """An imported classifier in this project's contract (see the module docstring).

    Args:
        net: the model (its input is the adapter's output; its output ``(B, C)`` logits or probabilities).
        adapter: the input adapter.
        classes: class names, one per output.
        feature_layer: dotted name (from this wrapper) of the feature layer.
        image_size: the input side the model expects (metadata).
        outputs: ``"logits"`` or ``"probabilities"`` (turned into logits: ``log p - log(1 - p)``).
        token_grid: ``(prefix_tokens, h, w)`` for a transformer feature layer, None for a CNN.
        head_name: dotted name of the ``nn.Linear`` after global average pooling (None: another head).
        spec: how to rebuild ``net`` (:func:`build_network`), stored in checkpoints.

    Attributes:
        arch: ``"<source>:<name>"``; class_names; thresholds (NaN = none); threshold_positives;
        min_val_positives; input_spec; feature_layer; head_kind (``gap_linear`` | ``other``); head (the
        ``nn.Linear`` or None); token_grid.
    """

    checkpoint_format = IMPORTED_FORMAT

    def __init__(self, net: nn.Module, adapter: InputAdapter, classes: Sequence[str], feature_layer: str,
                 image_size: int, outputs: str = "logits", token_grid: Sequence[int] | None = None,
                 head_name: str | None = None, spec: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        classes = [str(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not all(classes):
            raise ImportError_(f"classes must be a non-empty list of unique, non-empty names, got {classes}")
        if outputs not in OUTPUTS:
            raise ImportError_(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        self.normalize = adapter
        self.net = net
        self.class_names: list[str] = classes
        self.thresholds: list[float] = [float("nan")] * len(classes)  # none until given or calibrated
        self.threshold_positives: list[int] | None = None
        self.min_val_positives: int | None = None
        self.image_size = int(image_size)
        self.outputs = outputs
        self.token_grid = None if token_grid is None else tuple(int(v) for v in token_grid)
        self.head_name = head_name
        self.spec: dict[str, Any] = dict(spec or {})
        self.arch = str(self.spec.get("arch", "imported"))
        self.output_index: list[int] | None = None  # a class subset (select_classes) on a non-linear head
        self.feature_layer = feature_layer
        self._input_checked = False
        self.get_submodule(feature_layer)

    # ---- metadata ----
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def head(self) -> nn.Linear | None:
        """The ``nn.Linear`` after global average pooling (exact CAM), or None for another head."""
        return self.get_submodule(self.head_name) if self.head_name else None

    @property
    def penultimate_hint(self) -> str | None:
        """The block before the feature layer where the usual rule cannot see it (a DenseNet body: the
        second-to-last child of its ``features`` holding a convolution, e.g. ``transition3``), else None."""
        if not isinstance(self.net, _DenseNetForward):
            return None
        convs = [n for n, m in self.net.net.features.named_children()
                 if any(isinstance(c, nn.Conv2d) for c in m.modules())]
        return f"net.net.features.{convs[-2]}" if len(convs) >= 2 else None

    @property
    def head_kind(self) -> str:
        return "gap_linear" if self.head_name else "other"

    @property
    def input_spec(self) -> dict[str, Any]:
        """``{size, channels: 1, range: [0, 1], mean, std, scale, model_channels}``: what the wrapper takes
        (grey [0, 1]) and what it does inside (scale, repeat to ``model_channels``, mean/std)."""
        return {"size": self.image_size, "channels": 1, "range": [0.0, 1.0], **self.normalize.spec()}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, classes={len(self.class_names)}, feature_layer={self.feature_layer!r}"

    # ---- forward ----
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of images (B, 1, S, S) in [0, 1]."""
        from training.models import check_input

        check_input(self, x)
        out = self.net(self.normalize(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.outputs == "probabilities":
            p = out.float().clamp(_PROB_EPS, 1 - _PROB_EPS)
            out = torch.log(p) - torch.log1p(-p)                                # logit
        if self.output_index is not None:
            out = out[:, self.output_index]
        return out

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), features (B, K, h, w))`` in one pass: the feature layer's output (patch tokens
        on the grid for a ViT)."""
        with _feature_hook(self.get_submodule(self.feature_layer)) as seen:
            logits = self(x)
        return logits, self._as_maps(seen[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, K, h, w) of ``feature_layer``."""
        return self.forward_all(x)[1]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from feature maps: GAP then the linear ``head``.

        Raises:
            ValueError: the head is not GAP + linear (``head_kind == "other"``).
        """
        if self.head is None:
            raise ValueError(f"{self.arch}: the head is not global average pooling + linear; logits come from "
                             "forward(images) only")
        return self.head(feats.mean(dim=(2, 3)))                                # (B, K) -> (B, C)

    def _as_maps(self, acts: torch.Tensor) -> torch.Tensor:
        if self.token_grid is None:
            return acts
        return tokens_to_maps(acts, self.token_grid)

    # ---- class subsets (the audit's shared classes) ----
    def select_classes(self, names: Sequence[str]) -> "ImportedClassifier":
        """A copy whose outputs are ``names`` (a subset, in that order); metadata follows.

        A GAP + linear head is replaced by its rows (so CAM stays exact); any other head is indexed at the
        output.
        """
        from training.models import class_indices, linear_rows, subset_metadata

        idx = class_indices(self.class_names, names)
        new = copy.deepcopy(self)
        if new.head_name:
            parent_name, _, leaf = new.head_name.rpartition(".")
            parent = new.get_submodule(parent_name) if parent_name else new
            setattr(parent, leaf, linear_rows(new.head, idx))
        else:
            base = new.output_index or list(range(len(self.class_names)))
            new.output_index = [base[i] for i in idx]
        subset_metadata(new, self, idx)
        return new


@contextlib.contextmanager
def _feature_hook(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``module``'s outputs (cloned: later in-place ops cannot change them); hook removed in finally."""
    seen: list[torch.Tensor] = []

    def hook(_m, _i, out):
        seen.append((out[0] if isinstance(out, (tuple, list)) else out).clone())

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def is_imported(model: Any) -> bool:
    """Whether ``model`` is an :class:`ImportedClassifier`."""
    return isinstance(model, ImportedClassifier)


def tokens_to_maps(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Transformer tokens as feature maps: prefix (class, register) tokens dropped, patch tokens on the grid.

    Args:
        tokens: (B, N, D) with ``N = prefix + h * w``.
        grid: ``(prefix, h, w)``.

    Returns:
        (B, D, h, w).

    Raises:
        ValueError: ``N`` is not ``prefix + h * w``.
    """
    prefix, h, w = (int(v) for v in grid)
    if tokens.dim() != 3 or tokens.shape[1] != prefix + h * w:
        raise ValueError(f"tokens must be (B, {prefix} + {h}*{w}, D) for grid {tuple(grid)}, got {tuple(tokens.shape)}")
    B, _, D = tokens.shape
    return tokens[:, prefix:].transpose(1, 2).reshape(B, D, h, w)            # (B, N, D) -> (B, D, h, w)


# ---- sources ----------------------------------------------------------------------------------------
def xrv_targets(net: nn.Module) -> list[str]:
    """A TorchXRayVision model's output names mapped to canonical NIH spellings
    (:func:`training.data.labels.canonical_label`); names with no NIH counterpart are kept as they are, and
    an unused output (``""`` in its ``targets``) is named ``unused_<index>``."""
    from training.data.labels import canonical_label

    targets = getattr(net, "targets", None)
    if targets is None:
        import torchxrayvision as xrv

        targets = xrv.datasets.default_pathologies
    out = []
    for i, name in enumerate(targets):
        name = str(name).strip()
        if not name:
            out.append(f"unused_{i}")
            continue
        try:
            out.append(canonical_label(name, strict=True))
        except ValueError:
            out.append(name)
    return out


def _parse_source(source: str) -> tuple[str, str]:
    kind, sep, name = str(source).partition(":")
    if not sep or kind not in SOURCES or not name.strip():
        raise ImportError_(f"bad model source {source!r}; valid forms: xrv:<Class> (e.g. xrv:DenseNet), timm:<name>, "
                           "torchvision:<name>, torchscript:<file>, factory:<module>:<function>")
    return kind, name.strip()


def build_network(spec: Mapping[str, Any]) -> nn.Module:
    """The architecture of ``spec`` with no pretrained weights (never a download).

    Args:
        spec: ``{"source": "xrv"|"timm"|"torchvision"|"torchscript"|"factory", "name": ..., "kwargs": {...},
            "num_classes": C, "channels": 1|3, "image_size": S}``; a TorchScript spec holds ``program`` (the
            saved program as a uint8 tensor) instead of a file once imported.

    Raises:
        ImportError_: an unknown architecture name (valid ones listed or pointed to), a factory that cannot be
            imported or does not return an ``nn.Module``, a TorchScript file that cannot be read.
    """
    kind, name = spec["source"], spec["name"]
    kwargs = dict(spec.get("kwargs") or {})
    n, channels, size = int(spec["num_classes"]), int(spec["channels"]), int(spec["image_size"])
    if kind == "xrv":
        try:
            import torchxrayvision as xrv
        except ImportError as exc:
            raise ImportError_(f"xrv:{name} needs torchxrayvision (pip install 'cxr-interpret[import]'): {exc}") from None
        cls = getattr(xrv.models, name, None)
        valid = sorted(k for k, v in vars(xrv.models).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and k[:1].isupper() and not k.startswith("_"))
        if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ImportError_(f"unknown TorchXRayVision model class {name!r}; valid: {', '.join(valid)}")
        if kwargs.get("weights") is not None:
            raise ImportError_("xrv weights are never downloaded: pass weights=None (the default) and the local "
                               "state dict as --weights")
        kwargs["weights"] = None
        return cls(**kwargs)
    if kind == "timm":
        import timm

        if name not in timm.list_models():
            raise ImportError_(f"unknown timm model {name!r} (see timm.list_models())")
        try:  # transformers take the input side (their patch grid); CNNs do not
            return timm.create_model(name, pretrained=False, num_classes=n, in_chans=channels, img_size=size, **kwargs)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=n, in_chans=channels, **kwargs)
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ImportError_(f"unknown torchvision model {name!r}; valid: "
                               f"{', '.join(torchvision.models.list_models(module=torchvision.models))}")
        net = torchvision.models.get_model(name, weights=None, num_classes=n, **kwargs)
        if channels == 1:
            _grey_first_conv(net)
        return net
    if kind == "torchscript":
        program = spec.get("program")
        try:
            if program is not None:
                net = torch.jit.load(io.BytesIO(program.numpy().tobytes()), map_location="cpu")
            else:
                net = torch.jit.load(str(Path(name).expanduser()), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any reader error means "not a TorchScript file"
            raise ImportError_(f"cannot read TorchScript file {name}: {str(exc).splitlines()[0][:200]}") from None
        return _script_chain(net, spec)
    if kind == "factory":
        mod_name, sep, fn_name = name.partition(":")
        if not sep or not mod_name or not fn_name:
            raise ImportError_(f"bad factory {name!r}; expected <module>:<function>, e.g. mypkg.models:build")
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or an error raised while importing it
            raise ImportError_(f"cannot import factory module {mod_name!r}: {type(exc).__name__}: {exc}") from None
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ImportError_(f"factory module {mod_name!r} has no callable {fn_name!r}")
        net = fn(**kwargs)
        if not isinstance(net, nn.Module):
            raise ImportError_(f"factory {name} returned {type(net).__name__}, not a torch.nn.Module")
        return net
    raise ImportError_(f"unknown source {kind!r}; valid: {', '.join(SOURCES)}")


def _grey_first_conv(net: nn.Module) -> None:
    """Replace the first ``Conv2d`` of ``net`` (3 input channels) by a 1-channel one (for 1-channel weights)."""
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == 1:
                return
            new = nn.Conv2d(1, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.groups,
                            mod.bias is not None)
            parent_name, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, leaf, new)
            return
    raise ImportError_("channels=1 needs a first Conv2d to take one channel; the model has none")


def _script_chain(program: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    names = [n for n, _ in program.named_children()]
    if len(names) < 2:
        raise ImportError_("a TorchScript model must have at least two top-level children (a trunk and a head) to "
                           "be split at a feature layer; export it as a state dict or a factory instead")
    split = spec.get("split")
    if split is None:
        x = torch.rand(1, int(spec["channels"]), int(spec["image_size"]), int(spec["image_size"]))
        chain = _ScriptChain(program, len(names))
        split = 0
        with torch.no_grad():
            for i, mod in enumerate(chain.trunk.values()):
                if getattr(mod, "original_name", "") == "Linear" and x.dim() == 4:
                    x = torch.flatten(x, 1)
                x = mod(x)
                if x.dim() == 4 and x.shape[-1] * x.shape[-2] > 1:
                    split = i + 1
        if not split:
            raise ImportError_("no top-level child of the TorchScript model outputs a spatial map (B, K, h, w)")
        x = torch.rand(2, int(spec["channels"]), int(spec["image_size"]), int(spec["image_size"]))
        with torch.no_grad():
            whole, chained = program(x), _ScriptChain(program, int(split))(x)
        if not torch.is_tensor(whole) or whole.shape != chained.shape or not torch.allclose(whole, chained, atol=1e-5,
                                                                                             rtol=1e-4):
            raise ImportError_("the TorchScript model's forward is not the sequence of its top-level children, so it "
                               "cannot be split at a feature layer; import it as a state dict with its architecture "
                               "(timm:, torchvision:) or a factory instead")
    return _ScriptChain(program, int(split))


# ---- state dicts ----------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A local state dict (``{"state_dict": ...}`` / ``{"model": ...}`` wrappers unwrapped), read with
    ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file. ImportError_: not a state dict (a pickled module is refused: convert it
            with ``torch.save(torch.load(f, weights_only=False).state_dict(), out)`` if you trust the file).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p.resolve()} (weights are never downloaded)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a pickled module or another format
        raise ImportError_(f"{p}: not a state dict readable with weights_only=True ({type(exc).__name__}); a pickled "
                           "model must be converted: torch.save(torch.load(f, weights_only=False).state_dict(), out) "
                           "if you trust the file") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ImportError_(f"{p}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], where: str = "weights", limit: int = 5) -> None:
    """Refuse a state dict that does not fit ``net`` exactly, naming the first mismatches.

    Raises:
        ImportError_: missing keys, unexpected keys or shape mismatches (the first ``limit`` of each, with counts).
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{label} ({len(items)}): {items[:limit]}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    if problems:
        raise ImportError_(f"{where} does not fit the architecture: " + "; ".join(problems))


# ---- finding the feature layer and the head ----------------------------------------------------------
def _token_grid(net: nn.Module, size: int) -> tuple[str, tuple[int, int, int]] | None:
    """``(block name, (prefix tokens, h, w))`` of a timm or torchvision vision transformer, else None."""
    blocks, patch = getattr(net, "blocks", None), getattr(net, "patch_embed", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and patch is not None:
        grid = getattr(patch, "grid_size", None) or (size // patch.patch_size[0], size // patch.patch_size[1])
        return f"blocks.{len(blocks) - 1}", (int(getattr(net, "num_prefix_tokens", 1)), int(grid[0]), int(grid[1]))
    encoder = getattr(net, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is not None and hasattr(net, "class_token") and hasattr(net, "patch_size"):
        g = int(getattr(net, "image_size", size)) // int(net.patch_size)
        return f"encoder.layers.{len(layers) - 1}", (1, g, g)
    return None


def _dry_run(model: nn.Module, size: int, channels: int) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...]]]]:
    """The output of a random batch and every named module's output shape, in the order they finished."""
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, torch.jit.ScriptModule):
            continue

        def hook(_m, _i, out, name=name):
            out = out[0] if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]) else out
            if torch.is_tensor(out):
                order.append((name, tuple(out.shape)))

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    return out, order


def _candidates(order: Sequence[tuple[str, tuple[int, ...]]]) -> list[str]:
    names = [n for n, s in order if (len(s) == 4 and s[-1] * s[-2] > 1) or len(s) == 3]
    return list(dict.fromkeys(names))


# ---- import ----------------------------------------------------------------------------------------
def import_model(source: str, *, weights: str | os.PathLike | None = None, classes: Sequence[str] | None = None,
                 image_size: int = 224, channels: int | None = None, scale: Sequence[float] | None = None,
                 mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None,
                 outputs: str = "logits", feature_layer: str | None = None,
                 model_kwargs: Mapping[str, Any] | None = None) -> ImportedClassifier:
    """Build, load and wrap an existing classifier (see the module docstring).

    Args:
        source: ``xrv:<Class>``, ``timm:<name>``, ``torchvision:<name>``, ``torchscript:<file>`` or
            ``factory:<module>:<function>``.
        weights: a local state dict (strict: every key and shape must fit), or None (the architecture's own
            initialisation; a TorchScript program carries its weights).
        classes: class names, one per output (default for ``xrv:``: its ``targets`` mapped to NIH spellings;
            required otherwise). Canonical NIH spellings let the audit match them to a probing set's labels.
        image_size: the input side S.
        channels: the model's input channels, 1 or 3 (default 1 for ``xrv:``, else 3).
        scale: what [0, 1] becomes before mean/std (default ``(-1024, 1024)`` for ``xrv:``, else ``(0, 1)``).
        mean, std: after scaling (default 0 / 1 for ``xrv:``; ImageNet's statistics for 3 channels, the grey
            ImageNet statistics for 1, otherwise).
        outputs: ``logits`` or ``probabilities`` (what the network returns).
        feature_layer: dotted name inside the network (e.g. ``layer4``); default found automatically.
        model_kwargs: keyword arguments of the architecture or factory (JSON-able).

    Returns:
        The :class:`ImportedClassifier` in eval mode, thresholds all NaN (none).

    Raises:
        ImportError_: a bad source, spec or weights file, an output width that differs from the class list, an
            unknown feature layer (candidates listed): always before anything is written.
        FileNotFoundError: a weights or TorchScript file that does not exist.
    """
    from training.models import GREY_MEAN, GREY_STD

    kind, name = _parse_source(source)
    size = int(image_size)
    if size < 16:
        raise ImportError_(f"image_size must be >= 16 px, got {image_size}")
    kwargs = dict(model_kwargs or {})
    ch = int(channels if channels is not None else (1 if kind == "xrv" else 3))
    if ch not in (1, 3):
        raise ImportError_(f"input channels must be 1 or 3 (a chest X-ray is grey), got {ch}")
    if kind == "xrv":
        scale = (-1024.0, 1024.0) if scale is None else scale
        mean, std = (0.0 if mean is None else mean), (1.0 if std is None else std)
        if name == "DenseNet":
            kwargs.setdefault("in_channels", ch)
    else:
        scale = (0.0, 1.0) if scale is None else scale
        if mean is None:
            mean = [0.485, 0.456, 0.406] if ch == 3 else GREY_MEAN
        if std is None:
            std = [0.229, 0.224, 0.225] if ch == 3 else GREY_STD
    adapter = InputAdapter(ch, scale, mean, std)
    if kind == "torchscript":
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript file not found: {path.resolve()}")
    if classes is not None:
        classes = [str(c).strip() for c in classes]
        n = len(classes)
    elif kind == "xrv":
        n = int(kwargs.get("num_classes", 18))
    else:
        raise ImportError_(f"{source}: pass the class names (one per output)")
    spec: dict[str, Any] = {"arch": f"{kind}:{Path(name).name if kind == 'torchscript' else name}", "source": kind,
                            "name": name, "kwargs": kwargs, "num_classes": n, "channels": ch, "image_size": size}
    if kind == "xrv" and "num_classes" not in kwargs:
        kwargs["num_classes"] = n
    net = build_network(spec)
    if kind == "xrv" and classes is None:
        classes = xrv_targets(net)
    if kind == "torchscript":
        spec["program"] = torch.frombuffer(bytearray(Path(name).expanduser().read_bytes()), dtype=torch.uint8)
        spec["split"] = len(net.trunk)
        spec["name"] = Path(name).name
    if weights:
        state = read_state_dict(weights)
        check_state_dict(net, state, where=str(weights))
        net.load_state_dict(state, strict=True)
    net.eval()
    densenet = kind in ("xrv", "torchvision") and hasattr(net, "features") and isinstance(
        getattr(net, "classifier", None), nn.Linear)
    body = _DenseNetForward(net) if densenet else net
    grid = None
    vit = _token_grid(net, size)
    probe = ImportedClassifier(body, adapter, classes, "net", size, outputs, spec=spec).eval()
    try:
        out, order = _dry_run(probe, size, ch)
    except Exception as exc:  # noqa: BLE001 - a model that does not run on the stated input
        raise ImportError_(f"{source} does not run on a (2, {ch}, {size}, {size}) input after the adapter: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    if out.dim() != 2 or out.shape[1] != len(classes):
        raise ImportError_(f"{source} returns outputs of shape {tuple(out.shape)} but {len(classes)} classes were "
                           f"given ({classes[:5]}{'...' if len(classes) > 5 else ''}); one class name per output")
    order = [(n, s) for n, s in order if n.startswith("net.")]  # not the adapter, not the whole network
    candidates = _candidates(order)
    if feature_layer:
        inner = "net.net." if densenet else "net."
        layer = feature_layer if feature_layer in candidates else (
            "net.relu" if densenet and feature_layer == "relu" else inner + feature_layer)
        if layer not in candidates:
            raise ImportError_(f"unknown feature layer {feature_layer!r}; candidates (spatial maps or tokens, last "
                               f"first): {', '.join(reversed(candidates[-12:]))}")
    elif densenet:
        layer = "net.relu"
    elif vit is not None:
        layer, grid = f"net.{vit[0]}", vit[1]  # the network is the wrapper's "net" here (no DenseNet body)
    else:
        spatial = [n for n, s in order if len(s) == 4 and s[-1] * s[-2] > 1]
        if not spatial:
            raise ImportError_(f"{source}: no layer outputs a spatial map (B, K, h, w) with h * w > 1 at {size} px "
                               "(and it is not a ViT); pass --feature-layer")
        layer = spatial[-1]
    if grid is None and vit is not None and layer == f"net.{vit[0]}":
        grid = vit[1]
    if grid is None:
        shape = dict(order).get(layer)
        if shape is not None and len(shape) == 3:
            if vit is None:
                raise ImportError_(f"feature layer {layer!r} outputs tokens {shape} but the token grid is unknown "
                                   "(not a timm or torchvision ViT); choose a spatial layer")
            grid = vit[1]
    model = ImportedClassifier(body, adapter, classes, layer, size, outputs, grid, None, spec).eval()
    model.head_name = _exact_linear_head(model, size)
    log.info("imported %s: %d classes, feature layer %s, head %s", spec["arch"], len(classes), layer, model.head_kind)
    return model


def _exact_linear_head(model: ImportedClassifier, size: int, atol: float = 1e-4) -> str | None:
    """The dotted name of an ``nn.Linear`` whose output on the pooled feature maps equals the logits (checked on
    a random batch), or None."""
    if model.outputs != "logits":
        return None
    with torch.no_grad():
        x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(1))
        logits, feats = model.forward_all(x)
        if feats.dim() != 4:
            return None
        pooled = feats.mean(dim=(2, 3))                                         # (B, K)
        for name, mod in reversed(list(model.named_modules())):
            if isinstance(mod, nn.Linear) and mod.in_features == pooled.shape[1] and \
                    mod.out_features == logits.shape[1]:
                if torch.allclose(mod(pooled), logits, atol=atol, rtol=1e-4):
                    return name
    return None


# ---- checkpoints ---------------------------------------------------------------------------------------
def save_imported(model: ImportedClassifier) -> dict[str, Any]:
    """The checkpoint dict of an imported model (written by :func:`training.models.save_checkpoint`)."""
    spec = {k: v for k, v in model.spec.items()}
    return {"format": IMPORTED_FORMAT, "arch": model.arch, "spec": spec, "classes": list(model.class_names),
            "image_size": model.image_size, "outputs": model.outputs, "token_grid": model.token_grid,
            "head_name": model.head_name, "feature_layer": model.feature_layer,
            "output_index": model.output_index, "adapter": model.normalize.spec(),
            "densenet": isinstance(model.net, _DenseNetForward)}


def load_imported(ckpt: Mapping[str, Any]) -> ImportedClassifier:
    """Rebuild an imported model from its checkpoint dict (strict: every key must fit)."""
    spec = dict(ckpt["spec"])
    net = build_network(spec)
    body = _DenseNetForward(net) if ckpt.get("densenet") else net
    a = ckpt["adapter"]
    adapter = InputAdapter(a["model_channels"], a["scale"], a["mean"], a["std"])
    model = ImportedClassifier(body, adapter, ckpt["classes"], ckpt["feature_layer"], ckpt["image_size"],
                               ckpt["outputs"], ckpt.get("token_grid"), None, spec)
    model.head_name = ckpt.get("head_name")
    model.output_index = ckpt.get("output_index")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


# ---- thresholds ---------------------------------------------------------------------------------------
def calibrate_thresholds(model: nn.Module, manifest: str | os.PathLike, *, split: str = "val",
                         min_positives: int | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Per-class decision thresholds of ``model`` chosen on a manifest's split (max F1,
    :func:`training.metrics.choose_thresholds`): a class with fewer than ``min_positives`` known positives
    there gets none (NaN). Sets ``thresholds``, ``threshold_positives`` and ``min_val_positives`` on the model.

    Args:
        model: a classifier (``class_names``; ``model(x) -> logits``).
        manifest: the user's manifest; its ``split`` rows are used.
        split: ``val`` (default), ``train``, ``test``.
        min_positives: default :data:`training.metrics.MIN_VAL_POSITIVES`.
        batch_size: images per forward pass.

    Returns:
        ``{"images": N, "positives": {class: n}, "thresholds": {class: t | None}}``.

    Raises:
        ValueError: the split has no images.
    """
    from training.data.dataset import ManifestDataset
    from training.metrics import MIN_VAL_POSITIVES, choose_thresholds, positive_counts
    from training.train import predict

    minimum = int(MIN_VAL_POSITIVES if min_positives is None else min_positives)
    ds = ManifestDataset(manifest, classes=list(model.class_names), image_size=int(model.input_spec["size"]),
                         split=split)
    if len(ds) == 0:
        raise ValueError(f"no images in split {split!r} of {manifest}; thresholds are calibrated on a validation split")
    probs, targets = predict(model, ds, batch_size)
    thresholds = choose_thresholds(targets, probs, min_positives=minimum)
    counts = positive_counts(targets)
    model.thresholds = [float(t) for t in thresholds]
    model.threshold_positives = [int(n) for n in counts]
    model.min_val_positives = minimum
    return {"images": len(ds), "positives": dict(zip(model.class_names, map(int, counts))),
            "thresholds": {c: (float(t) if math.isfinite(float(t)) else None)
                           for c, t in zip(model.class_names, thresholds)}}
