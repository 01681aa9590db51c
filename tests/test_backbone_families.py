"""DINOv2 and DINOv3 backbones: registered; their official release files (and timm's) load
strictly through timm's own converters; attention maps with register tokens and rotary
embeddings are the model's real attention; each one trains and serves. Tiny random configs of
the registry's own timm architectures (model_kwargs overrides, here only) keep this fast."""

import base64
import io
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.layers import apply_rot_embed_cat

import train
from conftest import make_dataset, synthetic_image
from vehicle_classifier import config, registry
from vehicle_classifier.serving.api import create_app
from vehicle_classifier.backbone import (
    OnCrops, WeightsError, cls_attention, create_backbone, has_cls_attention, load_backbone, preprocessing_for,
)
from vehicle_classifier.config import ServiceConfig, TrainConfig
from vehicle_classifier.artifact import load_artifact
from vehicle_classifier.runtime import cpu_supports_bf16
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import run_training

pytestmark = pytest.mark.integration

NEW = [name for name in registry.BACKBONES if name.startswith(("dinov2-", "dinov3-"))]


def tiny(name: str, **shrink) -> registry.BackboneSpec:
    """The registry entry shrunk: same timm architecture, pretrained config and pooling."""
    spec = registry.BACKBONES[name]
    if "convnext" in spec.architecture:
        size, defaults = 32, {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
    else:
        size = 56 if "patch14" in spec.architecture else 64  # a 4x4 grid of patches
        defaults = {"img_size": size, "embed_dim": 48, "depth": 2, "num_heads": 2}
    overlay = {**spec.model_kwargs.get("pretrained_cfg_overlay", {}), "input_size": [3, size, size]}
    kwargs = {**spec.model_kwargs, **defaults, **shrink, "pretrained_cfg_overlay": overlay}
    return replace(spec, name=f"tiny-{name}", model_kwargs=kwargs)


def random_state(spec: registry.BackboneSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """timm's layout, every tensor random (layer-scale and biases too, so that a tensor loaded
    into the wrong place shows)."""
    torch.manual_seed(seed)
    state = create_backbone(spec.architecture, spec.model_kwargs).state_dict()
    return {k: torch.randn_like(v) * 0.1 for k, v in state.items()}


# --- the official release layouts, built by reversing timm's converters (tests only) --------
def official_dinov2(state: dict, grid: int | None = None) -> dict:
    """facebookresearch/dinov2's layout: register_tokens, a mask_token, and a [CLS] position in
    pos_embed even with registers (timm folds it into cls_token). `grid`: the position grid the
    file was trained at (518 px: 37), resampled by timm to the one we run at."""
    out = {k.replace("reg_token", "register_tokens"): v for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.randn(1, dim)
    if "register_tokens" in out:
        cls_pos = torch.randn(1, 1, dim)
        out["cls_token"] = state["cls_token"] - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    if grid:
        out["pos_embed"] = torch.randn(1, 1 + grid * grid, dim)
    return out


def official_dinov3_vit(state: dict) -> dict:
    """facebookresearch/dinov3's ViT layout: storage_tokens, ls1/ls2.gamma, one qkv bias with
    its mask (the k part is masked to zero, so timm drops it), SwiGLU as w1/w2/w3, a
    mask_token and the RoPE periods buffer."""
    out = {}
    swiglu = any("fc1_g" in k for k in state)
    for k, v in state.items():
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            out[base + "qkv.bias"] = torch.cat([v, torch.randn_like(v), state[base + "v_bias"]])
            out[base + "qkv.bias_mask"] = torch.cat([torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
            continue
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
        k = k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2")
        out[k.replace("mlp.fc2", "mlp.w3") if swiglu else k] = v
    out["mask_token"] = torch.randn(1, state["cls_token"].shape[-1])
    out["rope_embed.periods"] = torch.rand(6)
    return out


def official_convnext(state: dict) -> dict:
    """The original ConvNeXt layout DINOv3 ships: downsample_layers, dwconv, pwconv, norm."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.", r"stages.\1.", k)
        out[k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm", "norm")] = v
    return out


def official(spec: registry.BackboneSpec, state: dict) -> dict:
    if spec.name.startswith("tiny-dinov2"):
        return official_dinov2(state)
    return official_convnext(state) if "convnext" in spec.architecture else official_dinov3_vit(state)


def assert_loaded(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k in state:
        assert torch.allclose(loaded[k], state[k], atol=1e-6), k


# --- registry --------------------------------------------------------------------------------
def test_backbone_flag_lists_dinov2_and_dinov3():
    for name in ("dinov2-vits14", "dinov2-vits14-reg", "dinov2-vitb14", "dinov2-vitb14-reg", "dinov3-vits16",
                 "dinov3-vits16plus", "dinov3-vitb16", "dinov3-convnext-tiny", "dinov3-convnext-small"):
        assert name in train.HELP["backbone"]  # what --help says
        assert train.build_parser().parse_args(["--backbone", name]).backbone == name
        assert registry.get_spec(name) is registry.BACKBONES[name]


def test_each_has_its_own_preprocessing():
    sizes = {}
    for name in ("dinov2-vits14", "dinov3-vits16", "dinov3-convnext-tiny"):
        spec = registry.BACKBONES[name]
        shallow = {"depths": [1, 1, 1, 1]} if "convnext" in name else {"depth": 1}  # depth: no bearing on it
        sizes[name] = preprocessing_for(create_backbone(spec.architecture, {**spec.model_kwargs, **shallow}))
    # DINOv2 at 224 px from a 256 px resize, as its linear evaluation (not its 518 px grid).
    assert (sizes["dinov2-vits14"]["input_size"], sizes["dinov2-vits14"]["resize_size"]) == (224, 256)
    assert sizes["dinov3-vits16"]["input_size"] == 256 and sizes["dinov3-vits16"]["resize_size"] == 256
    assert sizes["dinov3-convnext-tiny"]["input_size"] == 224
    for prep in sizes.values():
        assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["interpolation"] == "bicubic"


# --- loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dinov2-vits14", "dinov2-vits14-reg", "dinov3-vits16", "dinov3-vits16plus",
                                  "dinov3-convnext-tiny"])
def test_official_release_file_loads_strictly_and_equals_timm_file(tmp_path, name):
    spec = tiny(name)
    state = random_state(spec, seed=1)
    torch.save(official(spec, state), tmp_path / spec.official_file)  # release files: plain state dicts
    save_file(state, str(tmp_path / "model.safetensors"))  # timm's hub file
    from_official, _ = load_backbone(spec, tmp_path / spec.official_file)
    from_timm, _ = load_backbone(spec, tmp_path / "model.safetensors")
    assert_loaded(from_official, state)
    assert_loaded(from_timm, state)
    x = torch.randn(2, 3, *[spec.model_kwargs["pretrained_cfg_overlay"]["input_size"][-1]] * 2)
    with torch.no_grad():
        assert torch.allclose(from_official(x), from_timm(x), atol=1e-5)


@pytest.mark.parametrize("name", ["dinov2-vits14", "dinov2-vits14-reg"])
def test_dinov2_file_at_518px_grid_is_resampled_to_the_grid_we_run_at(tmp_path, name):
    spec = tiny(name)
    state = random_state(spec, seed=2)
    torch.save(official_dinov2(state, grid=9), tmp_path / "w.pth")  # as 518 px is to 224 px
    model, _ = load_backbone(spec, tmp_path / "w.pth")
    assert model.pos_embed.shape == state["pos_embed"].shape
    others = {k: v for k, v in state.items() if k not in ("pos_embed", "cls_token")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in others.items())


def test_real_dinov2_release_file_at_518px_loads_into_the_224px_registry_model(tmp_path):
    """The registry's own ViT-S/14 (one block deep, to be quick): the release file's 37x37
    position grid, its mask_token, loaded strictly into the 16x16 grid we run at."""
    spec = registry.BACKBONES["dinov2-vits14"]
    spec = replace(spec, model_kwargs={**spec.model_kwargs, "depth": 1})
    release = create_backbone(spec.architecture, {"depth": 1}).state_dict()  # timm's 518 px layout
    assert release["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save({**release, "mask_token": torch.zeros(1, 384)}, tmp_path / spec.official_file)
    model, _ = load_backbone(spec, tmp_path / spec.official_file)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc2.weight"], release["blocks.0.mlp.fc2.weight"])


@pytest.mark.parametrize("name, other, words", [
    ("dinov2-vits14", tiny("dinov2-vitb14", embed_dim=64), "another shape"),     # ViT-B weights into ViT-S
    ("dinov2-vits14-reg", tiny("dinov2-vits14"), "missing"),                     # no registers in the file
    ("dinov3-vits16", tiny("dinov3-vits16", patch_size=8), "another shape"),    # not resampled from /8
    ("dinov3-vits16", tiny("dinov2-vits14", img_size=64, patch_size=16), "do not fit"),  # a DINOv2 file
    ("dinov3-convnext-tiny", tiny("dinov3-convnext-tiny", depths=[1, 2, 1, 1]), "do not fit"),
])
def test_official_file_of_another_backbone_is_refused(tmp_path, name, other, words):
    path = tmp_path / "other.pth"
    torch.save(official(other, random_state(other)), path)
    with pytest.raises(WeightsError, match=words) as info:
        load_backbone(tiny(name), path)
    assert "do not fit" in str(info.value)


# --- attention -------------------------------------------------------------------------------
def test_dinov3_attention_is_the_rotary_attention_over_patches_without_registers():
    spec = tiny("dinov3-vits16")
    model = create_backbone(spec.architecture, spec.model_kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, maps = cls_attention(model, x)
        assert torch.allclose(features, model(x), atol=1e-5)
        # The last block's attention, explicitly: q/k with biases, rotary embedding on patches.
        tokens, rope = model._pos_embed(model.patch_embed(x))
        for block in model.blocks[:-1]:
            tokens = block(tokens, rope=rope)
        attn, prefix = model.blocks[-1].attn, model.num_prefix_tokens
        h = model.blocks[-1].norm1(tokens)
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = torch.nn.functional.linear(h, attn.qkv.weight, bias).reshape(2, -1, 3, 2, 24).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=True)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=True)], dim=2)
        weights = (q * attn.scale @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]
    assert prefix == 5  # [CLS] and 4 registers, none of them in the map
    assert maps.shape == (2, 4, 4)
    assert torch.allclose(maps, weights[:, :, prefix:].mean(1).reshape(2, 4, 4), atol=1e-5)
    assert attn.fused_attn == model.blocks[0].attn.fused_attn  # put back as it was


def test_dinov2_register_attention_leaves_registers_out():
    spec = tiny("dinov2-vits14-reg")
    model = create_backbone(spec.architecture, spec.model_kwargs)
    with torch.no_grad():
        x = torch.randn(1, 3, 56, 56)
        _, maps = cls_attention(model, x)
        to_registers = 1 - float(maps.sum())  # the rest of [CLS]'s attention went to itself and registers
    assert maps.shape == (1, 4, 4) and model.num_prefix_tokens == 5
    assert 0 < to_registers < 1


def test_convnext_has_no_attention_maps():
    spec = tiny("dinov3-convnext-tiny")
    model = create_backbone(spec.architecture, spec.model_kwargs)
    assert not has_cls_attention(model)
    with pytest.raises(ValueError, match="no attention"):
        cls_attention(model, torch.zeros(1, 3, 32, 32))


# --- each trains and serves ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "Car-Bike", per_class=8)


# Shrunk, the registry's nine entries are five architectures: ViT-S and ViT-B (ConvNeXt tiny and
# small) differ only in the sizes `tiny` overrides. One of each trains and serves.
SHRUNK_ARCHITECTURES = ["dinov2-vits14", "dinov2-vits14-reg", "dinov3-vits16", "dinov3-vits16plus",
                        "dinov3-convnext-tiny"]


def test_every_new_entry_shrinks_to_an_architecture_trained_and_served_below():
    def layout(name):
        spec = tiny(name)
        model = create_backbone(spec.architecture, spec.model_kwargs)
        return type(model), {k: tuple(v.shape) for k, v in model.state_dict().items()}

    covered = [layout(name) for name in SHRUNK_ARCHITECTURES]
    assert len({repr(c) for c in covered}) == len(covered)  # five different ones
    for name in NEW:
        assert layout(name) in covered, name


@pytest.mark.parametrize("name", SHRUNK_ARCHITECTURES)
def test_each_trains_and_serves_from_its_official_file(tmp_path, monkeypatch, small_dataset, name):
    spec = tiny(name)
    monkeypatch.setitem(registry.BACKBONES, spec.name, spec)
    weights = tmp_path / spec.official_file
    state = random_state(spec, seed=3)
    torch.save(official(spec, state), weights)
    cfg = TrainConfig(backbone=spec.name, max_epochs=10, patience=5)
    metrics = run_training(Job(small_dataset, tmp_path / "out", cfg, weights, tmp_path / "cache", spec=spec))
    assert metrics["test"]["count"] > 0

    # The float graph as served (bf16 where the CPU has it); the int8 graph's fidelity is
    # tests/test_int8.py's and training's gate's.
    app = create_app(ServiceConfig(model_dir=tmp_path / "out", precision="bf16" if cpu_supports_bf16() else "fp32"))
    predictor = app.extensions["vehicle_classifier"].predictor
    assert predictor.runtime == "openvino" and predictor.source == "exported"  # the CPU path without torch
    assert predictor.metadata["backbone"]["name"] == spec.name
    model = load_artifact(tmp_path / "out" / config.ARTIFACT_FILE)
    assert_loaded(model.backbone, state)  # the release file's weights, through the artifact
    client = app.test_client()
    photo = io.BytesIO()
    synthetic_image("Car", np.random.default_rng(0)).save(photo, "JPEG")
    answer = client.post("/predict", data=photo.getvalue(), content_type="image/jpeg")
    assert answer.status_code == 200 and answer.get_json()["label"] in ("Bike", "Car")
    assert client.get("/metadata").get_json()["attention_maps"] == ("convnext" not in name)
    with_attention = client.post("/predict?attention=1", data=photo.getvalue(), content_type="image/jpeg")
    if "convnext" in name:
        assert with_attention.status_code == 400 and "not available" in with_attention.get_json()["error"]
    else:
        assert with_attention.status_code == 200
        assert Image.open(io.BytesIO(base64.b64decode(with_attention.get_json()["attention_png"])))

    # The served float forward, the exported graph (bf16 where the CPU has it), gives torch fp32's
    # features of the same crops.
    size = model.preprocessing["input_size"]
    pixels = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    with torch.no_grad():
        reference = OnCrops(model.backbone, model.preprocessing)(torch.from_numpy(pixels))
    served, _ = predictor.forward(pixels, False)
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(served), reference).min() > 0.999
