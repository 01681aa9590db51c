"""Backbone weights: official DINO checkpoints and timm files load strictly; anything that does
not fit is refused with a message; nothing is ever unpickled; attention maps are real."""

import argparse
import pickle

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_SPEC
from vehicle_classifier.backbone import (
    WeightsError, cls_attention, create_backbone, load_backbone, preprocessing_for, read_checkpoint, state_dict_digest,
)
from vehicle_classifier.registry import BACKBONES, BackboneSpec

pytestmark = pytest.mark.integration


def tiny_state(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**TINY_SPEC.model_kwargs, **overrides}
    return create_backbone(TINY_SPEC.architecture, kwargs).state_dict()


def assert_same_weights(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_official_dino_checkpoint_loads_strictly(tmp_path):
    state = tiny_state(seed=1)
    path = tmp_path / "dino_pretrain.pth"
    torch.save(state, path)  # the release files are plain state dicts
    model, digest = load_backbone(TINY_SPEC, path)
    assert_same_weights(model, state)
    assert digest == state_dict_digest(state)
    assert not any(p.requires_grad for p in model.parameters())  # frozen
    assert not model.training


def test_official_full_training_checkpoint_uses_teacher_backbone(tmp_path):
    teacher, student = tiny_state(seed=2), tiny_state(seed=3)
    wrap = lambda s: {f"module.backbone.{k}": v for k, v in s.items()} | {"module.head.last_layer.weight": torch.zeros(4, 4)}
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save({"student": wrap(student), "teacher": wrap(teacher), "epoch": 100}, path)
    model, _ = load_backbone(TINY_SPEC, path)
    assert_same_weights(model, teacher)


def test_timm_safetensors_loads_and_digest_ignores_file_format(tmp_path):
    state = tiny_state(seed=4)
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "model.safetensors"))
    model, digest_st = load_backbone(TINY_SPEC, tmp_path / "model.safetensors")
    _, digest_pth = load_backbone(TINY_SPEC, tmp_path / "w.pth")
    assert_same_weights(model, state)
    assert digest_st == digest_pth


@pytest.mark.parametrize("overrides, words", [
    ({"depth": 3}, "unexpected"),          # a deeper ViT: extra blocks
    ({"depth": 1}, "missing"),             # a shallower one
    ({"embed_dim": 64}, "another shape"),  # wider
    ({"patch_size": 4}, "another shape"),  # ViT-S/8 weights into ViT-S/16
])
def test_mismatched_checkpoint_is_refused(tmp_path, overrides, words):
    path = tmp_path / "other.pth"
    torch.save(tiny_state(**overrides), path)
    with pytest.raises(WeightsError, match=words) as info:
        load_backbone(TINY_SPEC, path)
    assert "do not fit" in str(info.value)


def test_real_vit_s16_refuses_vit_s8_checkpoint(tmp_path):
    """The registry's own architectures: a ViT-S/8 file is not silently resampled into ViT-S/16."""
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(384, 3, 8, 8)}, path)
    with pytest.raises(WeightsError, match="do not fit"):
        load_backbone(BACKBONES["dino-vits16"], path)


def test_pickled_objects_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": Evil()}, f)
    with pytest.raises(WeightsError, match="cannot read"):
        load_backbone(TINY_SPEC, path)
    assert not (tmp_path / "pwned").exists()


def test_a_pickle_of_other_objects_is_refused_without_torchs_unsafe_advice(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, path)  # a training script's pickle
    with pytest.raises(WeightsError, match="cannot read weights file") as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "weights_only" not in message and "state_dict" in message


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 100])
def test_unreadable_weights_file_is_one_clear_error(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_backbone(TINY_SPEC, path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone(TINY_SPEC, tmp_path / "nope.pth")


def test_offline_without_cache_fails_fast_asking_for_a_weights_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    spec = BackboneSpec("x", "vit_small_patch16_224.dino", official_file="dino_deitsmall16_pretrain.pth")
    with pytest.raises(WeightsError) as info:
        load_backbone(spec)
    assert info.value.setting == "weights" and "dino_deitsmall16_pretrain.pth" in str(info.value)
    assert "offline mode is on (HF_HUB_OFFLINE)" in str(info.value)


def test_dino_preprocessing_comes_from_the_tagged_pretrained_config():
    prep = preprocessing_for(create_backbone(BACKBONES["dino-vits16"].architecture))
    assert prep["input_size"] == 224
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet stats, not timm's 0.5 default
    assert prep["interpolation"] == "bicubic"
    assert prep["resize_size"] >= 224


def test_cls_attention_matches_explicit_attention_and_features():
    model = create_backbone(TINY_SPEC.architecture, TINY_SPEC.model_kwargs)
    x = torch.randn(2, 3, 32, 32)
    features, maps = cls_attention(model, x)
    assert torch.allclose(features, model(x), atol=1e-5)
    assert maps.shape == (2, 4, 4)
    # Recompute the last block's attention the slow, explicit way.
    attn = model.blocks[-1].attn
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = model._pos_embed(tokens)
        tokens = model.norm_pre(tokens)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        h = model.blocks[-1].norm1(tokens)
        b, n, c = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = (qkv[0] @ qkv[1].transpose(-2, -1) * attn.scale).softmax(-1)
        expected = weights[:, :, 0, 1:].mean(1).reshape(2, 4, 4)
    assert torch.allclose(maps, expected, atol=1e-5)
    assert (maps > 0).all()
