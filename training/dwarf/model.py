"""DWARF model: ViT patch tokens + disease queries -> per-disease attention maps, refined by experts.

The model follows the KAD / DeViDe query-decoder design used by DWARF (disease-weighted attention map
refinement):

1. an image encoder (an open_clip ``VisionTransformer`` loaded by :func:`training.clip.load_clip`, read
   through :func:`training.clip.encode_image_tokens`) turns a grey image into patch tokens ``(B, N, W)``;
2. disease-name embeddings from a text encoder (the CLIP text tower, or any callable that embeds
   prompts) are the decoder queries; they are computed once and stored as a buffer, so a trained DWARF
   model needs no tokenizer or text tower at inference;
3. a pre-norm transformer decoder (self-attention between queries, then cross-attention from queries to
   patch tokens, then an MLP) whose cross-attention weights, averaged over heads (and over the last
   ``map_layers`` layers) are the raw map ``M_c`` of each disease;
4. a classification head per query (one weight vector per disease, applied to that disease's output
   token);
5. one expert head per disease mapping ``M_c`` to the refined map ``M'_c``. Each expert is a small
   residual CNN whose last layer starts at zero, so ``M'_c == M_c`` exactly at initialisation
   ("Identity Enhanced Initialization"; ``expert_init="random"`` is the paper's Fig. 2 ablation, both
   convolutions at PyTorch's default random initialisation). All experts run at once as grouped
   convolutions.
6. classification from ``(I, M'_c)`` (DWARF Algorithm 1, line 15; ``classify_from="map"``, the
   default): the patch tokens of the image are pooled under the refined map of each disease (the map
   averaged onto the patch grid and normalised to sum 1), and the logit is
   ``w_c . q_c + v_c . pool(I, M'_c) + b_c`` with ``q_c`` the disease's decoder output token. So the
   refined map feeds the prediction, and the classification loss reaches the expert heads. The paper
   does not spell out the classifier's form; this pooled-token head is our reading (a named departure
   in the docs). ``classify_from="query"`` is the earlier design (``w_c . q_c + b_c``, the map never
   feeds classification); checkpoints written before this option load as ``"query"``.

Images entering the model are float32 ``(B, 1, S, S)`` in [0, 1]; normalisation lives inside.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.prompts import PROMPT_TEMPLATE, class_prompts

log = logging.getLogger(__name__)


EXPERT_INITS = ("identity", "random")
CLASSIFY_FROM = ("map", "query")


@dataclass
class DwarfConfig:
    """Architecture of the DWARF head on top of a ViT image encoder."""

    classes: list[str]  # disease names, one query (and one expert) each
    d_model: int = 128  # width of the query decoder
    decoder_layers: int = 2  # number of pre-norm decoder layers
    heads: int = 4  # attention heads of the decoder (cross-attention maps are averaged over them)
    mlp_ratio: float = 2.0  # decoder MLP width / d_model
    dropout: float = 0.0
    map_layers: int = 1  # maps = mean cross-attention of the last k decoder layers
    expert_hidden: int = 8  # channels of each disease's expert CNN
    expert_kernel: int = 5  # kernel size of the expert convolutions (odd)
    expert_size: int = 32  # experts compute their correction at most at this resolution (0: full size)
    use_experts: bool = True  # False: refined map == raw map (GAIN-style / pretrained baselines)
    expert_init: str = "identity"  # "identity" (Identity Enhanced Initialization) or "random" (Fig. 2 ablation)
    classify_from: str = "map"  # "map": logits from (I, M'_c) (Algorithm 1 line 15); "query": query token only
    prompt_template: str = PROMPT_TEMPLATE
    vision: dict[str, Any] = field(default_factory=dict)  # open_clip vision config (see vision_config)

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("DwarfConfig.classes must name at least one disease")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")
        if not 1 <= self.map_layers <= self.decoder_layers:
            raise ValueError(f"map_layers={self.map_layers} must be in [1, decoder_layers={self.decoder_layers}]")
        if self.expert_kernel % 2 == 0:
            raise ValueError(f"expert_kernel={self.expert_kernel} must be odd")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init={self.expert_init!r}; valid: {', '.join(EXPERT_INITS)}")
        if self.classify_from not in CLASSIFY_FROM:
            raise ValueError(f"classify_from={self.classify_from!r}; valid: {', '.join(CLASSIFY_FROM)}")


# ---- image encoder ---------------------------------------------------------------------------
def vision_config(visual: nn.Module) -> dict[str, Any]:
    """Describe an open_clip ``VisionTransformer`` as a config dict that rebuilds it.

    The description is checked when the tower is rebuilt: :func:`build_vision_tower` loads the
    weights with ``strict=True``, so anything this misses fails loudly instead of silently.

    Args:
        visual: ``clip_model.visual`` of an open_clip CLIP model with a ViT image tower.

    Returns:
        ``{"embed_dim", "quick_gelu", "vision_cfg": {...}}`` (JSON-serialisable).

    Raises:
        ValueError: ``visual`` is not an open_clip ViT (e.g. a timm or ModifiedResNet tower).
    """
    from open_clip.transformer import LayerScale, QuickGELU, VisionTransformer
    from training.clip.loading import CONV_STEM_KEY, ConvStem

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"DWARF needs an open_clip VisionTransformer image tower, got {type(visual).__name__}; "
                         "valid: open_clip ViT models (e.g. cxr-tiny-vit, ViT-B-16)")
    if visual.attn_pool is not None:
        raise ValueError("open_clip ViT towers with an attentional pooler are not supported by DWARF")
    block = visual.transformer.resblocks[0]
    width = visual.conv1.out_channels
    ls = block.ls_1
    embed_dim = visual.output_dim if visual.proj is not None else width
    return {
        "embed_dim": int(embed_dim),
        "quick_gelu": isinstance(block.mlp.gelu, QuickGELU),
        "vision_cfg": {
            "image_size": int(visual.image_size[0]),
            "patch_size": int(visual.patch_size[0]),
            "width": int(width),
            "layers": len(visual.transformer.resblocks),
            "head_width": int(width // block.attn.num_heads),
            "mlp_ratio": block.mlp.c_fc.out_features / width,
            "ls_init_value": float(ls.gamma.detach().flatten()[0]) if isinstance(ls, LayerScale) else None,
            "no_ln_pre": isinstance(visual.ln_pre, nn.Identity),
            "pool_type": visual.pool_type,
            "final_ln_after_pool": bool(visual.final_ln_after_pool),
            **({CONV_STEM_KEY: int(visual.conv1.channels)} if isinstance(visual.conv1, ConvStem) else {}),
        },
    }


def build_vision_tower(config: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) open_clip ViT tower from :func:`vision_config` output (conv stem included)."""
    from open_clip.model import _build_vision_tower
    from training.clip.loading import CONV_STEM_KEY, apply_conv_stem

    vision_cfg = dict(config["vision_cfg"])
    stem = vision_cfg.pop(CONV_STEM_KEY, None)
    visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config["quick_gelu"])
    return apply_conv_stem(visual, int(stem)) if stem else visual


class ViTPatchEncoder(nn.Module):
    """Grey [0, 1] images -> ViT patch tokens, with the CLIP preprocessing inside.

    A thin module around :func:`training.clip.encode_image_tokens` and the bundle's
    :class:`training.clip.ImagePreprocess` (resize to the tower's side, grey -> 3 channels, CLIP
    mean/std), so DWARF sees exactly the tokens every other user of the CLIP sees. Non-square inputs
    are first resized to a square (no centre crop), so the maps stay aligned with the whole image.

    Args:
        visual: an open_clip ``VisionTransformer``.
        preprocess: the CLIP bundle's preprocessing (default: OpenAI mean/std, bicubic, at the tower's
            native side).
    """

    def __init__(self, visual: nn.Module, preprocess: Any | None = None) -> None:
        super().__init__()
        from training.clip import ImagePreprocess

        self.config = vision_config(visual)
        self.visual = visual
        self.native_size = self.config["vision_cfg"]["image_size"]
        self.preprocess = preprocess if preprocess is not None else ImagePreprocess(self.native_size)
        if int(self.preprocess.size) != self.native_size:
            raise ValueError(f"preprocess size {self.preprocess.size} != image tower side {self.native_size}")
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.width = self.config["vision_cfg"]["width"]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self.preprocess.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.preprocess.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (B, 1 or 3, H, W) in [0, 1] -> patch tokens (B, N, W), N = grid h * w."""
        from training.clip import encode_image_tokens

        h, w = images.shape[-2:]
        if h != w:
            side = max(h, w)
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        tokens, _ = encode_image_tokens(self.visual, images, self.preprocess)  # (B, N, W)
        return tokens


# ---- text queries ----------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(clip_model: nn.Module, tokenizer: Callable, classes: Sequence[str],
                   template: str = PROMPT_TEMPLATE) -> torch.Tensor:
    """Embed one prompt per disease with the CLIP text tower.

    Args:
        clip_model: an open_clip model (``encode_text``) or any module with that method.
        tokenizer: the model's tokenizer (list[str] -> token tensor).
        classes: disease names; underscores become spaces (``Pleural_Thickening``).
        template: prompt with one ``{}`` for the disease name.

    Returns:
        (C, E) L2-normalised text embeddings.
    """
    prompts = class_prompts(classes, template)
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    try:
        emb = clip_model.encode_text(tokenizer(prompts).to(device))
    finally:
        clip_model.train(was_training)
    return F.normalize(emb.float(), dim=-1)


# ---- decoder ---------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: queries self-attend, cross-attend to patch tokens, then an MLP."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm_q2 = nn.LayerNorm(d_model)
        self.norm_mem = nn.LayerNorm(d_model)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm_q3 = nn.LayerNorm(d_model)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_model))

    def forward(self, q: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` (B, C, D), ``mem`` (B, N, D) -> new queries (B, C, D), attention (B, C, N)."""
        h = self.norm_q1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        h, m = self.norm_q2(q), self.norm_mem(mem)
        out, attn = self.cross_attn(h, m, m, need_weights=True, average_attn_weights=True)  # attn (B, C, N)
        q = q + out
        q = q + self.mlp(self.norm_q3(q))
        return q, attn


class QueryDecoder(nn.Module):
    """Stack of :class:`DecoderLayer`; returns output queries and every layer's attention."""

    def __init__(self, d_model: int, layers: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, q: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attns = []
        for layer in self.layers:
            q, a = layer(q, mem)
            attns.append(a)
        return self.norm(q), attns  # (B, C, D), L x (B, C, N)


class ExpertHeads(nn.Module):
    """One small residual CNN per disease, run together as grouped convolutions.

    ``M' = clamp(M + up(f_c(down(M))), 0, 1)`` where ``f_c`` is conv-GELU-conv with its last conv at
    zero, so at initialisation ``M' == M`` exactly for maps in [0, 1] (Identity Enhanced
    Initialization). ``down``/``up`` resample to ``work_size`` when the map is larger (grouped
    convolutions are slow on CPU; the correction is smooth anyway), identity otherwise.
    """

    def __init__(self, num_classes: int, hidden: int = 8, kernel: int = 5, work_size: int = 0,
                 init: str = "identity") -> None:
        super().__init__()
        self.work_size = work_size
        pad = kernel // 2
        self.conv1 = nn.Conv2d(num_classes, num_classes * hidden, kernel, padding=pad, groups=num_classes)
        self.conv2 = nn.Conv2d(num_classes * hidden, num_classes, kernel, padding=pad, groups=num_classes)
        if init not in EXPERT_INITS:
            raise ValueError(f"expert init {init!r}; valid: {', '.join(EXPERT_INITS)}")
        if init == "identity":  # "random": keep nn.Conv2d's default random draw
            self.reset_identity()

    def reset_identity(self) -> None:
        """Set every expert back to the identity map."""
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def reset(self, init: str = "identity", generator: torch.Generator | None = None) -> None:
        """Re-initialise every expert: ``"identity"`` (``M' == M``: Identity Enhanced Initialization) or
        ``"random"`` (both convolutions redrawn with PyTorch's default Kaiming-uniform rule, the paper's
        Fig. 2 ablation; ``generator`` makes the draw reproducible)."""
        if init not in EXPERT_INITS:
            raise ValueError(f"expert init {init!r}; valid: {', '.join(EXPERT_INITS)}")
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                fan_in = conv.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d's default (kaiming_uniform a=sqrt(5)) bounds
                conv.weight.uniform_(-bound, bound, generator=generator)
                conv.bias.uniform_(-bound, bound, generator=generator)
        if init == "identity":
            self.reset_identity()

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """``maps`` (B, C, H, W) in [0, 1] -> refined maps (B, C, H, W) in [0, 1]."""
        size = maps.shape[-2:]
        small = maps
        if self.work_size and max(size) > self.work_size:
            small = F.adaptive_avg_pool2d(maps, (min(size[0], self.work_size), min(size[1], self.work_size)))
        delta = self.conv2(F.gelu(self.conv1(small)))
        if delta.shape[-2:] != size:
            delta = F.interpolate(delta, size=size, mode="bilinear", align_corners=False)
        return (maps + delta).clamp(0.0, 1.0)


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each (H, W) map of ``maps`` (..., H, W) to [0, 1] (differentiable)."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)


@dataclass
class DwarfOutput:
    """What :class:`DwarfModel` returns; every map is (B, C, S, S) in [0, 1] at the input size."""

    logits: torch.Tensor  # (B, C)
    raw_maps: torch.Tensor  # (B, C, S, S) min-max normalised cross-attention maps M_c
    refined_maps: torch.Tensor  # (B, C, S, S) expert-refined maps M'_c (== raw_maps without experts)
    attention: torch.Tensor  # (B, C, h, w) head-averaged cross-attention on the patch grid (sums to 1)


class DwarfModel(nn.Module):
    """ViT patch tokens + disease queries -> logits, raw and refined attention maps.

    Args:
        encoder: a :class:`ViTPatchEncoder`.
        text_embeddings: (C, E) disease-name embeddings (queries before projection); stored as a buffer.
        config: :class:`DwarfConfig` (its ``vision`` field is filled from the encoder).

    Example:
        >>> bundle = training.clip.load_clip("cxr-tiny-vit")          # doctest: +SKIP
        >>> model = build_dwarf(bundle, ["Nodule", "Effusion"])       # doctest: +SKIP
        >>> out = model(torch.rand(2, 1, 64, 64))                     # doctest: +SKIP
        >>> out.refined_maps.shape                                    # doctest: +SKIP
        torch.Size([2, 2, 64, 64])
    """

    def __init__(self, encoder: ViTPatchEncoder, text_embeddings: torch.Tensor, config: DwarfConfig) -> None:
        super().__init__()
        num_classes = len(config.classes)
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] != num_classes:
            raise ValueError(f"text_embeddings must be (C={num_classes}, E), got {tuple(text_embeddings.shape)}")
        config.vision = encoder.config
        self.config = config
        self.class_names = list(config.classes)
        self.thresholds = [0.5] * num_classes
        self.encoder = encoder
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())
        self.query_proj = nn.Linear(text_embeddings.shape[1], config.d_model)
        self.memory_proj = nn.Linear(encoder.width, config.d_model)
        self.decoder = QueryDecoder(config.d_model, config.decoder_layers, config.heads, config.mlp_ratio,
                                    config.dropout)
        self.cls_weight = nn.Parameter(torch.randn(num_classes, config.d_model) * config.d_model ** -0.5)
        self.cls_bias = nn.Parameter(torch.zeros(num_classes))
        # v_c of the (I, M'_c) head (Algorithm 1 line 15); absent in the "query" design
        self.map_cls_weight = nn.Parameter(torch.randn(num_classes, config.d_model) * config.d_model ** -0.5) \
            if config.classify_from == "map" else None
        self.experts = ExpertHeads(num_classes, config.expert_hidden, config.expert_kernel, config.expert_size,
                                   init=config.expert_init) if config.use_experts else None

    @property
    def input_spec(self) -> dict[str, Any]:
        return {"size": self.encoder.native_size, "channels": 1, "range": [0.0, 1.0],
                "mean": list(self.encoder.mean), "std": list(self.encoder.std)}

    def forward(self, images: torch.Tensor) -> DwarfOutput:
        """Args: ``images`` (B, 1, S, S) float in [0, 1]. Returns: :class:`DwarfOutput`."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1, S, S), got {tuple(images.shape)}")
        b, _, height, width = images.shape
        mem = self.memory_proj(self.encoder(images))  # (B, N, D)
        q = self.query_proj(self.text_embeddings).unsqueeze(0).expand(b, -1, -1)  # (B, C, D)
        q, attns = self.decoder(q, mem)
        logits = (q * self.cls_weight).sum(-1) + self.cls_bias  # (B, C): one head per query
        gh, gw = self.encoder.grid
        attn = torch.stack(attns[-self.config.map_layers:]).mean(0)  # (B, C, N)
        attn = attn.view(b, -1, gh, gw).float()  # (B, C, h, w)
        raw = minmax_normalize(F.interpolate(attn, size=(height, width), mode="bilinear", align_corners=False))
        refined = self.experts(raw) if self.experts is not None else raw
        if self.map_cls_weight is not None:  # classify from (I, M'_c): tokens pooled under the refined map
            weights = F.adaptive_avg_pool2d(refined, (gh, gw)).flatten(-2)  # (B, C, N)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
            pooled = torch.bmm(weights.to(mem.dtype), mem)  # (B, C, D)
            logits = logits + (pooled * self.map_cls_weight).sum(-1)
        return DwarfOutput(logits=logits, raw_maps=raw, refined_maps=refined, attention=attn)

    # ---- persistence ----
    def checkpoint(self) -> dict[str, Any]:
        """Architecture + metadata + weights (for :func:`load_dwarf`)."""
        return {"format": "cxr-dwarf/1", "config": asdict(self.config), "thresholds": list(self.thresholds),
                "preprocess": self.encoder.preprocess.params(), "text_dim": int(self.text_embeddings.shape[1]),
                "state_dict": self.state_dict()}


def build_dwarf(bundle: Any, classes: Sequence[str], text_embeddings: torch.Tensor | None = None,
                **config: Any) -> DwarfModel:
    """Build a DWARF model from a :class:`training.clip.ClipBundle` (from :func:`training.clip.load_clip`).

    Args:
        bundle: CLIP bundle (``model``, ``tokenizer``, ``preprocess``); the image tower (``model.visual``)
            must be an open_clip ViT. Its ``preprocess`` (mean/std/interpolation) moves into the model.
            The image tower is deep-copied, so fine-tuning DWARF leaves the bundle untouched.
        classes: disease names (queries / experts, in this order).
        text_embeddings: (C, E) query embeddings; default: the CLIP text tower on
            ``prompt_template.format(disease)``. Pass embeddings of an HF BERT-like encoder here to use a
            medical text encoder instead.
        **config: :class:`DwarfConfig` fields.

    Returns:
        A :class:`DwarfModel` on the CLIP model's device.
    """
    import copy

    cfg = DwarfConfig(classes=list(classes), **config)
    clip_model = bundle.model
    if text_embeddings is None:
        text_embeddings = encode_prompts(clip_model, bundle.tokenizer, cfg.classes, cfg.prompt_template)
    encoder = ViTPatchEncoder(copy.deepcopy(clip_model.visual), getattr(bundle, "preprocess", None))
    device = next(clip_model.parameters()).device
    return DwarfModel(encoder, text_embeddings.to(device), cfg).to(device)


def load_dwarf(checkpoint: dict[str, Any] | str, map_location: str | torch.device = "cpu") -> DwarfModel:
    """Rebuild a :class:`DwarfModel` from :meth:`DwarfModel.checkpoint` (a dict or a ``torch.save`` path).

    Weights load with ``strict=True``: a mismatch between architecture and weights raises.
    """
    from training.clip import ImagePreprocess

    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=False)
    if checkpoint.get("format") != "cxr-dwarf/1":
        raise ValueError(f"not a DWARF checkpoint (format={checkpoint.get('format')!r}); valid: 'cxr-dwarf/1'")
    cfg = dict(checkpoint["config"])
    vision = cfg.pop("vision")
    cfg.setdefault("classify_from", "query")  # written before the option: the query-token head
    config = DwarfConfig(**cfg)
    pp = dict(checkpoint["preprocess"])
    preprocess = ImagePreprocess(size=int(pp["size"]), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                                 interpolation=pp["interpolation"])
    encoder = ViTPatchEncoder(build_vision_tower(vision), preprocess)
    num_classes = len(config.classes)
    model = DwarfModel(encoder, torch.zeros(num_classes, checkpoint["text_dim"]), config)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.thresholds = list(checkpoint.get("thresholds", model.thresholds))
    return model.to(map_location).eval()
