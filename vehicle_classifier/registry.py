"""The backbones by name: the DINO, DINOv2 and DINOv3 table, and `timm:<model name>` for any timm
model. Free of torch (timm is imported only to resolve a `timm:` name's pretrained tag), so that
train.py's up-to-date check and its --help read the same table as a training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import UserError

# `timm:<model name>`: any timm model (with or without its pretrained tag) besides the table below.
TIMM_PREFIX = "timm:"


class WeightsError(UserError):
    """Backbone weights could not be found or do not fit the architecture (or the backbone's name
    is unknown)."""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: the timm architecture, where its pretrained weights live, and which file
    the official DINO / DINOv2 / DINOv3 release calls them. `model_kwargs` go to
    timm.create_model (and into the artifact, which rebuilds the backbone from them)."""

    name: str
    architecture: str  # timm name with its pretrained tag: that tag decides the preprocessing
    official_file: str = ""
    model_kwargs: dict = field(default_factory=dict)

    @property
    def hub_id(self) -> str:
        return f"timm/{self.architecture}"


# DINOv2 runs at 224 px, resized to 256 and centre-cropped as its linear evaluation does (the
# ImageNet figures its paper reports), not at the 518 px its weights' position grid was trained
# at: that measured 8x the cost per image of 224 px (benchmarks/bench_backbones.py, docs/backbones.md).
# timm resamples the position embeddings to the 16x16 grid when loading (backbone.load_strict).
DINOV2_AT_224 = {"pretrained_cfg_overlay": {"input_size": [3, 224, 224], "crop_pct": 0.875}}
# DINOv3: [CLS] pooling, as upstream and as the other backbones (timm's Eva default is the mean
# of the patch tokens); timm's own preprocessing for the release (256 px ViTs, 224 px ConvNeXts).
# The `_qkvb` ViTs keep the q/v biases of the official files, so that every tensor of those
# files is loaded (the plain variants drop them, assuming zeros).
DINOV3_CLS = {"global_pool": "token"}

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("dino-vits16", "vit_small_patch16_224.dino", official_file="dino_deitsmall16_pretrain.pth"),
        BackboneSpec("dino-vits8", "vit_small_patch8_224.dino", official_file="dino_deitsmall8_pretrain.pth"),
        BackboneSpec("dino-vitb16", "vit_base_patch16_224.dino", official_file="dino_vitbase16_pretrain.pth"),
        BackboneSpec("dino-vitb8", "vit_base_patch8_224.dino", official_file="dino_vitbase8_pretrain.pth"),
        BackboneSpec("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m",
                     official_file="dinov2_vits14_pretrain.pth", model_kwargs=DINOV2_AT_224),
        BackboneSpec("dinov2-vits14-reg", "vit_small_patch14_reg4_dinov2.lvd142m",
                     official_file="dinov2_vits14_reg4_pretrain.pth", model_kwargs=DINOV2_AT_224),
        BackboneSpec("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m",
                     official_file="dinov2_vitb14_pretrain.pth", model_kwargs=DINOV2_AT_224),
        BackboneSpec("dinov2-vitb14-reg", "vit_base_patch14_reg4_dinov2.lvd142m",
                     official_file="dinov2_vitb14_reg4_pretrain.pth", model_kwargs=DINOV2_AT_224),
        BackboneSpec("dinov3-vits16", "vit_small_patch16_dinov3_qkvb.lvd1689m",
                     official_file="dinov3_vits16_pretrain_lvd1689m-08c60483.pth", model_kwargs=DINOV3_CLS),
        BackboneSpec("dinov3-vits16plus", "vit_small_plus_patch16_dinov3_qkvb.lvd1689m",
                     official_file="dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", model_kwargs=DINOV3_CLS),
        BackboneSpec("dinov3-vitb16", "vit_base_patch16_dinov3_qkvb.lvd1689m",
                     official_file="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", model_kwargs=DINOV3_CLS),
        BackboneSpec("dinov3-convnext-tiny", "convnext_tiny.dinov3_lvd1689m",
                     official_file="dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"),
        BackboneSpec("dinov3-convnext-small", "convnext_small.dinov3_lvd1689m",
                     official_file="dinov3_convnext_small_pretrain_lvd1689m-296db49d.pth"),
    )
}


def get_spec(name: str, resolve_tag: bool = True) -> BackboneSpec:
    """The table's backbone of that name, or the timm model a `timm:` name gives: with its
    default pretrained tag looked up in timm (`resolve_tag`), or without timm, as written (the
    up-to-date check's torch-free reading). An unknown name raises WeightsError."""
    if name.startswith(TIMM_PREFIX):
        return timm_spec(name) if resolve_tag else BackboneSpec(name, name.removeprefix(TIMM_PREFIX))
    try:
        return BACKBONES[name]
    except KeyError:
        raise WeightsError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}, "
                           f"or {TIMM_PREFIX}<model name> for any timm model") from None


def timm_spec(name: str) -> BackboneSpec:
    """`timm:<model>[.<tag>]`: the model with its default pretrained tag unless one is given. The
    tag is part of the architecture because it decides the weights' hub repository and the
    preprocessing (timm's data config)."""
    import timm  # imports torch: only here, for a timm: name being trained or served

    model_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(model_name):
        raise WeightsError(f"unknown timm model {model_name!r} (timm.list_models() names them all)")
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise WeightsError(str(exc)) from None
    base, tag = timm.models.split_model_name_tag(model_name)
    tag = tag or getattr(cfg, "tag", "") or ""
    return BackboneSpec(name, f"{base}.{tag}" if tag else base)
