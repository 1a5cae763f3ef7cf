"""Chest X-ray classifiers by name: DenseNet121, ResNet50/18, T-DenseNet and tiny test variants.

Every model built by :func:`create_model` shares one layout (docs/ARCHITECTURE.md, "training
(classifiers)")::

    normalize  -> features (nn.Sequential, ends with a non-in-place ReLU) -> GAP -> head (nn.Linear)

- input ``(B, 1, S, S)`` float32 in **[0, 1]** (grey); the mean/std normalisation is a buffer-backed
  first layer, so ONNX, pyfunc, service and interpret feed the same tensors;
- ``forward(x) -> logits (B, C)``; ``forward_features(x) -> (B, K, h, w)``, the post-ReLU maps of
  ``feature_layer`` (a dotted name usable with ``model.get_submodule``);
- ``head`` is an ``nn.Linear(K, C)`` applied after global average pooling, so CAM
  (``head.weight @ features``) is exact;
- metadata: ``arch``, ``class_names``, ``thresholds`` (per class, default 0.5; NaN = no threshold: the
  class had too few validation positives, see :func:`training.metrics.choose_thresholds`),
  ``threshold_positives`` (validation positives per class the thresholds rest on; None when unknown, as
  in checkpoints written before it existed), ``min_val_positives``, ``input_spec``.

torchvision's DenseNet applies a functional ``relu(inplace=True)`` after ``norm5`` in its own
``forward``; we never call that ``forward``. The final ReLU is a module (``features.relu``) that is not
in-place, so tensors captured by hooks on ``feature_layer`` are never changed afterwards.

Pretrained weights come only from a local file (``pretrained=PATH``): a torchvision / ImageNet state
dict, a CheXNet-style checkpoint (``module.densenet121.`` prefixes), or a checkpoint written by
:func:`save_checkpoint`. Three-channel first-conv weights are summed over channels (a grey image
replicated to RGB gives the same activations). Loading is strict: backbone keys missing from the file
raise ``ValueError`` naming them; keys the architecture does not use are reported (and raise too,
unless they belong to a classifier head or to blocks that T-DenseNet cuts off). Nothing is ever
downloaded: torchvision models are built with ``weights=None``.

Example:
    >>> model = create_model("test_resnet", classes=["Effusion", "Nodule"])
    >>> model(torch.rand(2, 1, 64, 64)).shape
    torch.Size([2, 2])
    >>> model.forward_features(torch.rand(2, 1, 64, 64)).shape[:2]
    torch.Size([2, 32])
"""
from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import resnet as tv_resnet

log = logging.getLogger(__name__)

__all__ = ["CXRClassifier", "create_model", "list_models", "save_checkpoint", "load_checkpoint", "probabilities",
           "load_pretrained", "GREY_MEAN", "GREY_STD"]

# Grey statistics of ImageNet (mean of the RGB means/stds): consistent with summing RGB first-conv
# weights over channels.
GREY_MEAN = 0.449
GREY_STD = 0.226
CHECKPOINT_FORMAT = "cxr-classifier/1"


class Normalize(nn.Module):
    """``(x - mean) / std`` with buffers (so it is saved, moved and exported with the model)."""

    def __init__(self, mean: float = GREY_MEAN, std: float = GREY_STD) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.register_buffer("mean", torch.tensor([float(mean)]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([float(std)]).view(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """The input check of every classifier (trained or imported): ``(B, 1, S, S)``, and once, a warning when the
    values lie outside [0, 1] (the model normalises internally). Skipped while tracing or exporting.

    Raises:
        ValueError: not a (B, 1, S, S) tensor.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, S, S) float in [0, 1], got shape {tuple(x.shape)}")
    if not model._input_checked and x.numel():
        model._input_checked = True
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            warnings.warn(f"{model.arch}: input range [{lo:.3g}, {hi:.3g}] is outside [0, 1]; the model "
                          "normalises internally and expects images scaled to [0, 1]", stacklevel=4)


class CXRClassifier(nn.Module):
    """A grey-input classifier: ``normalize -> features -> GAP -> head``.

    Build instances with :func:`create_model`.

    Args:
        arch: registry name (recorded in checkpoints).
        features: the spatial trunk; its last module must produce the post-ReLU maps.
        num_features: channels K of the feature maps.
        classes: class names (C of them).
        feature_layer: dotted name of the module whose output are the feature maps.
        image_size: the input side the model expects (metadata; any side works).
        mean, std: grey normalisation applied inside the model.
        config: keyword arguments that rebuild the architecture (stored in checkpoints).

    Attributes:
        class_names: list[str]; thresholds: list[float] per class (default 0.5; NaN = none fitted);
        threshold_positives: list[int] | None, validation positives per class behind the thresholds;
        min_val_positives: int | None, the minimum a threshold needed;
        input_spec: ``{size, channels, range, mean, std}``; feature_layer: str.
    """

    def __init__(self, arch: str, features: nn.Sequential, num_features: int, classes: Sequence[str],
                 feature_layer: str, image_size: int = 224, mean: float = GREY_MEAN, std: float = GREY_STD,
                 config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        classes = [str(c) for c in classes]
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be a non-empty list of unique names, got {classes}")
        self.arch = arch
        self.normalize = Normalize(mean, std)
        self.features = features
        self.head = nn.Linear(num_features, len(classes))
        self.num_features = int(num_features)
        self.feature_layer = feature_layer
        self.class_names: list[str] = classes
        self.thresholds: list[float] = [0.5] * len(classes)
        self.threshold_positives: list[int] | None = None  # set with thresholds chosen on validation
        self.min_val_positives: int | None = None
        self.image_size = int(image_size)
        self.config: dict[str, Any] = dict(config or {})
        self._input_checked = False
        self.get_submodule(feature_layer)  # a typo fails at build time

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_spec(self) -> dict[str, Any]:
        """``{size, channels, range, mean, std}`` of the expected input."""
        return {"size": self.image_size, "channels": 1, "range": [0.0, 1.0],
                "mean": self.normalize.mean.flatten().tolist(), "std": self.normalize.std.flatten().tolist()}

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(self, x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps of ``feature_layer``.

        Args:
            x: (B, 1, S, S) float in [0, 1].

        Returns:
            (B, K, h, w) post-ReLU maps (h = S/32 for DenseNet121/ResNet, S/8 for T-DenseNet).
        """
        self._check_input(x)
        return self.features(self.normalize(x))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from feature maps (B, K, h, w): GAP then the linear head."""
        return self.head(feats.mean(dim=(2, 3)))  # (B, K) -> (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of images (B, 1, S, S) in [0, 1]."""
        return self.forward_head(self.forward_features(x))

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (B, C), features (B, K, h, w))`` in one pass (used by the ONNX export)."""
        feats = self.forward_features(x)
        return self.forward_head(feats), feats

    def select_classes(self, names: Sequence[str]) -> "CXRClassifier":
        """A copy whose outputs are ``names`` (a subset, in that order): the head keeps their rows (CAM stays
        exact) and the metadata follows (what the audit scores when a probing set labels only some classes)."""
        idx = class_indices(self.class_names, names)
        new = copy.deepcopy(self)
        new.head = linear_rows(self.head, idx)
        subset_metadata(new, self, idx)
        return new

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, classes={len(self.class_names)}, feature_layer={self.feature_layer!r}"


def class_indices(classes: Sequence[str], names: Sequence[str]) -> list[int]:
    """Indices of ``names`` among ``classes``; an unknown name lists the valid ones."""
    missing = [n for n in names if n not in classes]
    if missing or not names:
        raise ValueError(f"classes {missing or names} are not outputs of the model; valid: {list(classes)}")
    return [list(classes).index(n) for n in names]


def linear_rows(lin: nn.Linear, idx: Sequence[int]) -> nn.Linear:
    """A new ``nn.Linear`` holding the rows ``idx`` of ``lin`` (a head restricted to some classes)."""
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[list(idx)])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[list(idx)])
    return new.to(lin.weight.device, lin.weight.dtype)


def subset_metadata(new: nn.Module, old: nn.Module, idx: Sequence[int]) -> None:
    """Class names, thresholds and their positives of ``old`` restricted to ``idx``, set on ``new``."""
    new.class_names = [old.class_names[i] for i in idx]
    new.thresholds = [old.thresholds[i] for i in idx]
    if old.threshold_positives is not None:
        new.threshold_positives = [old.threshold_positives[i] for i in idx]


# ---- architecture builders ------------------------------------------------------------------
def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-input-channel copy of ``conv`` (weights re-initialised as summed RGB weights)."""
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _densenet_features(net: tv_densenet.DenseNet, cut_after: str | None = None) -> tuple[nn.Sequential, int]:
    mods = OrderedDict()
    for name, mod in net.features.named_children():
        mods[name] = _grey_conv(mod) if name == "conv0" else mod
        if name == cut_after:
            break
    if cut_after is None:
        channels = net.features.norm5.num_features
        mods["relu"] = nn.ReLU(inplace=False)
    else:
        channels = _out_channels(mods[cut_after])
        mods["norm"] = nn.BatchNorm2d(channels)
        mods["relu"] = nn.ReLU(inplace=False)
    return nn.Sequential(mods), channels


def _out_channels(block: nn.Module) -> int:
    if isinstance(block, tv_densenet._DenseBlock):
        layers = list(block.children())
        return layers[0].norm1.num_features + len(layers) * layers[-1].conv2.out_channels
    raise ValueError(f"cannot infer output channels of {type(block).__name__}")


def _resnet_features(net: tv_resnet.ResNet) -> tuple[nn.Sequential, int]:
    mods = OrderedDict(conv1=_grey_conv(net.conv1), bn1=net.bn1, relu=net.relu, maxpool=net.maxpool,
                       layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4)
    return nn.Sequential(mods), net.fc.in_features


def _tiny_resnet(width: int = 8) -> tuple[nn.Sequential, int]:
    """ResNet layout (conv1, bn1, relu, maxpool, layer1..4 of torchvision BasicBlocks), tiny widths."""
    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(tv_resnet.BasicBlock(cin, cout, stride, down))

    w = width
    mods = OrderedDict(conv1=nn.Conv2d(1, w, 3, 2, 1, bias=False), bn1=nn.BatchNorm2d(w), relu=nn.ReLU(inplace=True),
                       maxpool=nn.Identity(), layer1=block(w, w, 1), layer2=block(w, 2 * w, 2),
                       layer3=block(2 * w, 4 * w, 2), layer4=block(4 * w, 4 * w, 1))
    return nn.Sequential(mods), 4 * w


@dataclass(frozen=True)
class _Arch:
    build: Callable[[], tuple[nn.Sequential, int]]
    feature_layer: str
    family: str  # "densenet" | "resnet": how foreign state dicts are translated
    description: str
    cut_prefixes: tuple[str, ...] = ()  # foreign keys under these are expected to be unused
    new_prefixes: tuple[str, ...] = ()  # our keys that no foreign checkpoint has
    default_size: int = 224


_DENSE_CUT = ("features.transition2", "features.denseblock3", "features.transition3", "features.denseblock4",
              "features.norm5")

_REGISTRY: dict[str, _Arch] = {
    "densenet121": _Arch(lambda: _densenet_features(tv_densenet.densenet121(weights=None)), "features.relu",
                         "densenet", "DenseNet121, 1024 maps at S/32"),
    "resnet50": _Arch(lambda: _resnet_features(tv_resnet.resnet50(weights=None)), "features.layer4", "resnet",
                      "ResNet50, 2048 maps at S/32"),
    "resnet18": _Arch(lambda: _resnet_features(tv_resnet.resnet18(weights=None)), "features.layer4", "resnet",
                      "ResNet18, 512 maps at S/32"),
    "t_densenet": _Arch(lambda: _densenet_features(tv_densenet.densenet121(weights=None), cut_after="denseblock2"),
                        "features.relu", "densenet",
                        "DenseNet121 cut after denseblock2 + BN-ReLU + GAP + linear, 512 maps at S/8 (28x28 at 224)",
                        cut_prefixes=_DENSE_CUT, new_prefixes=("features.norm.",)),
    "test_densenet": _Arch(lambda: _densenet_features(tv_densenet.DenseNet(growth_rate=8, block_config=(1, 1),
                                                                           num_init_features=8, bn_size=2)),
                           "features.relu", "densenet", "tiny DenseNet for tests (2 blocks, 16 maps at S/8)",
                           default_size=64),
    "test_resnet": _Arch(_tiny_resnet, "features.layer4", "resnet", "tiny ResNet for tests (32 maps at S/8)",
                         default_size=64),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int | None = None, classes: Sequence[str] | None = None,
                 pretrained: str | os.PathLike | None = None, strict: bool = True, image_size: int | None = None,
                 mean: float = GREY_MEAN, std: float = GREY_STD) -> CXRClassifier:
    """Build a classifier by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: number of outputs when ``classes`` is not given (names become ``class_0`` ...).
        classes: class names (sets the number of outputs).
        pretrained: a local weights file (see the module docstring) or ``None`` for random weights.
            Never downloads.
        strict: raise on missing backbone keys / unused foreign keys (else log them as warnings).
        image_size: input side recorded in ``input_spec`` (default 224, 64 for test variants).
        mean, std: grey normalisation inside the model.

    Returns:
        A :class:`CXRClassifier` in train mode.

    Raises:
        ValueError: unknown name (lists valid ones), bad classes, or a checkpoint that does not fit.
        FileNotFoundError: ``pretrained`` does not exist.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(list_models())}")
    if classes is None:
        if num_classes is None or int(num_classes) < 1:
            raise ValueError(f"pass classes=[...] or num_classes >= 1, got num_classes={num_classes!r}")
        classes = [f"class_{i}" for i in range(int(num_classes))]
    elif num_classes is not None and int(num_classes) != len(classes):
        raise ValueError(f"num_classes={num_classes} disagrees with {len(classes)} classes")
    spec = _REGISTRY[name]
    features, k = spec.build()
    size = int(image_size or spec.default_size)
    config = {"image_size": size, "mean": float(mean), "std": float(std)}
    model = CXRClassifier(name, features, k, classes, spec.feature_layer, size, mean, std, config)
    if pretrained:
        load_pretrained(model, pretrained, strict=strict)
    return model


# ---- weights ----------------------------------------------------------------------------------
_DENSE_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {p.resolve()}")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return dict(obj), meta


def _translate(state: Mapping[str, torch.Tensor], spec: _Arch) -> dict[str, torch.Tensor]:
    """Foreign key names -> ours (``normalize.``/``features.``/``head.``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "model.", "densenet121.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(("normalize.", "head.")):
            out[key] = value
            continue
        if key.startswith("classifier.0."):  # CheXNet: classifier = Sequential(Linear, Sigmoid)
            out["head." + key.split(".", 2)[2]] = value
            continue
        if key.startswith(("classifier.", "fc.")):
            out["head." + key.split(".", 1)[1]] = value
            continue
        if spec.family == "densenet":
            key = _DENSE_OLD.sub(lambda m: m.group(1) + m.group(2), key)
        elif not key.startswith("features."):
            key = "features." + key
        out[key] = value
    return out


def load_pretrained(model: CXRClassifier, path: str | os.PathLike, strict: bool = True) -> dict[str, list[str]]:
    """Load a local weights file into ``model`` (see the module docstring for accepted formats).

    The head is loaded only when its shape matches (else it stays freshly initialised, logged).

    Args:
        model: a model from :func:`create_model`.
        path: local file.
        strict: raise ``ValueError`` on missing backbone keys or unused foreign keys.

    Returns:
        ``{"missing": [...], "unexpected": [...], "skipped": [...]}`` (skipped: head/cut keys).

    Raises:
        ValueError: keys or shapes that do not fit (when ``strict``), naming them.
        FileNotFoundError: missing file.
    """
    spec = _REGISTRY[model.arch]
    state, _ = _read_state_dict(path)
    state = _translate(state, spec)
    own = model.state_dict()
    skipped, unexpected, mismatched = [], [], []
    load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(spec.cut_prefixes) and key not in own:
            skipped.append(key)
            continue
        if key not in own:
            if key.startswith("head."):
                skipped.append(key)
            else:
                unexpected.append(key)
            continue
        target = own[key]
        if key == "features.conv0.weight" or key == "features.conv1.weight":
            if value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
                value = value.sum(1, keepdim=True)  # RGB -> grey: same response to a replicated grey image
        if value.shape != target.shape:
            if key.startswith("head."):
                skipped.append(key)
                log.info("pretrained head %s %s does not fit %s: head re-initialised", key, tuple(value.shape),
                         tuple(target.shape))
            else:
                mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        load[key] = value
    optional = ("normalize.", "head.") + spec.new_prefixes
    missing = [k for k in own if k not in load and not k.startswith(optional)
               and not k.endswith("num_batches_tracked")]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched[:10]}")
    if problems:
        message = f"{path} does not fit {model.arch}: " + "; ".join(problems)
        if strict or mismatched:
            raise ValueError(message)
        log.warning(message)
    model.load_state_dict(load, strict=False)
    log.info("loaded %d tensors from %s into %s (%d skipped)", len(load), path, model.arch, len(skipped))
    return {"missing": missing, "unexpected": unexpected, "skipped": skipped}


def probabilities(logits):
    """Per-class probabilities of a classifier's logits: an independent sigmoid per output.

    Every task of :mod:`training.train` (``multilabel``, and ``binary`` with its one ``Abnormal`` output)
    is trained with a per-output sigmoid loss, so this is the one mapping from logits to the
    probabilities that are thresholded, served and audited.

    Args:
        logits: (..., C) a NumPy array (computed in float64, returned as float32) or a torch tensor.

    Returns:
        Same shape and kind, in (0, 1).
    """
    if isinstance(logits, torch.Tensor):
        return torch.sigmoid(logits.float())
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid without overflow in exp


def _optional_ints(values: Any) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def save_checkpoint(model: CXRClassifier, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``{format, arch, config, classes, thresholds, threshold_positives, min_val_positives, input_spec,
    feature_layer, metadata, state_dict}`` (a missing threshold is stored as NaN).

    Args:
        model: a model from :func:`create_model`.
        path: output file (parents created).
        **metadata: JSON-able extras (e.g. ``epoch``, ``val_auroc``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model, "checkpoint_format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:  # an imported model
        from training.imported import save_imported

        ckpt = save_imported(model)
        ckpt.update({"thresholds": [float(t) for t in model.thresholds],
                     "threshold_positives": _optional_ints(getattr(model, "threshold_positives", None)),
                     "min_val_positives": _optional_int(getattr(model, "min_val_positives", None)),
                     "input_spec": model.input_spec, "metadata": dict(metadata),
                     "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}})
        torch.save(ckpt, path)
        return path
    ckpt = {"format": CHECKPOINT_FORMAT, "arch": model.arch, "config": dict(model.config),
            "classes": list(model.class_names), "thresholds": [float(t) for t in model.thresholds],
            "threshold_positives": _optional_ints(getattr(model, "threshold_positives", None)),
            "min_val_positives": _optional_int(getattr(model, "min_val_positives", None)),
            "input_spec": model.input_spec, "feature_layer": model.feature_layer, "metadata": dict(metadata),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    torch.save(ckpt, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> CXRClassifier:
    """Rebuild a model written by :func:`save_checkpoint` (strict: every key must fit).

    Returns:
        The model in eval mode with its class names, thresholds and ``checkpoint_metadata``.

    Raises:
        FileNotFoundError: missing file. ValueError: not a classifier checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p.resolve()}")
    ckpt = torch.load(p, map_location=map_location, weights_only=True)
    from training.imported import IMPORTED_FORMAT, load_imported

    if isinstance(ckpt, Mapping) and ckpt.get("format") == IMPORTED_FORMAT:
        model = load_imported(ckpt)  # an imported model (training.imported), rebuilt from its source
    elif not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p} is not a {CHECKPOINT_FORMAT} or {IMPORTED_FORMAT} checkpoint (written by save_checkpoint)")
    else:
        model = create_model(ckpt["arch"], classes=ckpt["classes"], **ckpt.get("config", {}))
        model.load_state_dict(ckpt["state_dict"], strict=True)
    from training.metrics import thresholds_from_json  # None (JSON null) or NaN: no threshold

    model.thresholds = thresholds_from_json(ckpt["thresholds"])
    model.threshold_positives = _optional_ints(ckpt.get("threshold_positives"))  # absent in older checkpoints
    model.min_val_positives = _optional_int(ckpt.get("min_val_positives"))
    model.checkpoint_metadata = dict(ckpt.get("metadata", {}))
    return model.to(map_location).eval()
