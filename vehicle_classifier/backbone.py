"""The frozen backbones (by name: registry.py): strict weight loading, timm's eval preprocessing,
[CLS] attention maps where the model has them, and `OnCrops`: the backbone as every forward runs it.

Weights come from, in order: a local file (train.py's `--weights`: the official DINO, DINOv2 or
DINOv3 release format or a timm .safetensors/.pth), the local Hugging Face cache, then a hub
download.
Loading is strict: a backbone silently left with random weights is the worst failure this
project can have.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import pickle
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from .config import HUB_TIMEOUT, HUB_WEIGHTS_FILE
from .images import CROP_MODES, RESAMPLING
from .registry import BackboneSpec, WeightsError


def create_backbone(architecture: str, model_kwargs: dict | None = None, empty: bool = False) -> nn.Module:
    """The architecture with random weights, frozen, in eval mode, returning the [CLS] feature.
    `empty`: no weights at all (on the meta device), for load_strict to fill: skips the random
    initialisation, ~5 s of a --force run on a busy 2-core machine (0.3 s instead)."""
    with torch.device("meta") if empty else contextlib.nullcontext():
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **(model_kwargs or {}))
    return model.eval().requires_grad_(False)


def preprocessing_for(model: nn.Module) -> dict:
    """Eval-time preprocessing from timm's data config for the model (its pretrained tag's input
    size, crop fraction, crop mode, interpolation, mean and std), as plain JSON-able values: the
    shorter side resized to `resize_size` (`input_size / crop_pct`, rounded down as timm does),
    then the centre `input_size` square ("squash": each side scaled on its own)."""
    data = timm.data.resolve_model_data_config(model)
    _, height, width = data["input_size"]
    # A ViT built at another size than its pretrained config's (img_size=...) only takes its own.
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        height, width = built
    if height != width:
        raise WeightsError(f"backbones with a non-square input ({height}x{width}) are not supported")
    if data["crop_mode"] not in CROP_MODES or data["interpolation"] not in RESAMPLING:
        raise WeightsError(f"timm's preprocessing for this backbone ({data['crop_mode']} crop, "
                           f"{data['interpolation']} interpolation) is not supported")
    return {
        "input_size": int(width),
        "resize_size": math.floor(width / data["crop_pct"]),
        "crop_mode": data["crop_mode"],
        "interpolation": data["interpolation"],
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
    }


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors themselves: the same weights give the same digest whatever file
    format they came in."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape: 0-d tensors (BatchNorm's counters) cannot be viewed as bytes directly.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# --- reading checkpoints --------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}", setting="weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message advises weights_only=False: never here
        raise WeightsError(f"cannot read weights file {path}: it holds Python objects besides tensors, which are "
                           "never unpickled here; save the state dict alone (torch.save(model.state_dict(), ...)) "
                           "or as .safetensors") from None
    except Exception as exc:  # a damaged or foreign file: say which, in one line
        raise WeightsError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    # Official DINO full checkpoints nest the networks ('teacher' is the one evaluated);
    # other trainers use 'model' or 'state_dict'.
    for key in ("teacher", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def _timm_filter(model: nn.Module):
    """timm's own converter for the model's family (`checkpoint_filter_fn` of
    timm.models.vision_transformer, eva, convnext...): official DINOv2 and DINOv3 files name
    their tensors differently (register_tokens, storage_tokens, ls1.gamma, downsample_layers)
    and carry pretraining-only ones (mask_token, rope periods); timm's own files pass through."""
    return getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)


def _converted(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    filter_fn = _timm_filter(model)
    if filter_fn is None:
        return state
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # eva's filter prints what it skips
            converted = filter_fn(dict(state), model)
    except KeyError as exc:  # a foreign layout the converter chokes on
        raise WeightsError(f"weights from {source} do not fit this backbone: it has no tensor {exc}") from None
    except Exception as exc:
        raise WeightsError(f"weights from {source} do not fit this backbone: "
                           f"{type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}") from None
    # The converters also resample a patch embedding of another size (ViT-S/8 weights into a
    # ViT-S/16): a different model, refused. Position embeddings may be resampled: that is
    # a change of input size (DINOv2's 518 px grid to the 224 px one we run at).
    reshaped = [f"{k} {tuple(state[k].shape)} != {tuple(converted[k].shape)}" for k in converted
                if k in state and k != "pos_embed" and converted[k].shape != state[k].shape]
    if reshaped:
        raise WeightsError(f"weights from {source} do not fit this backbone: {len(reshaped)} of another "
                           f"shape (e.g. {'; '.join(reshaped[:2])})")
    return converted


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every parameter or refuse with a message saying what does not fit. The file may be
    timm's or the official release's layout (converted by timm's own filter)."""
    expected = model.state_dict()
    # A classifier (timm's pretrained 'head.*', 'fc.*', 'classifier.*'; a DINO projection head in
    # full training checkpoints) is not part of the frozen feature extractor.
    classifier = model.pretrained_cfg.get("classifier") or "head"
    for prefix in {"head", *([classifier] if isinstance(classifier, str) else classifier)}:
        if not any(k.startswith(prefix + ".") for k in expected):
            state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    state = _converted(model, state, source)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:2])})")
    if problems:
        raise WeightsError(f"weights from {source} do not fit this backbone: " + "; ".join(problems))
    # assign: the checkpoint's tensors become the parameters (an empty model has none to copy into).
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)


def build_loaded(architecture: str, model_kwargs: dict | None, state: dict[str, torch.Tensor],
                 source: str) -> nn.Module:
    """The architecture holding `state`, loaded strictly. Built empty (no random initialisation)
    when every tensor comes from the checkpoint; an architecture with buffers that no checkpoint
    holds (computed at init and not saved: DINOv3's RoPE periods and zero key biases) is built
    fully, then loaded."""
    model = create_backbone(architecture, model_kwargs, empty=True)
    load_strict(model, state, source)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = create_backbone(architecture, model_kwargs)
        load_strict(model, state, source)
    return model


# --- finding pretrained weights -------------------------------------------------------------
def _hub_unreachable(spec: BackboneSpec, timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the hub cannot serve the weights file now, or None if it can. One metadata request
    through huggingface_hub itself, so its offline mode (HF_HUB_OFFLINE), endpoint (HF_ENDPOINT),
    proxies (HTTPS_PROXY, ...) and token apply, without retries: a missing network costs
    `timeout` seconds, where hf_hub_download alone retries for over a minute."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, is_offline_mode
    from huggingface_hub.errors import HfHubHTTPError

    if is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        get_hf_file_metadata(hf_hub_url(spec.hub_id, HUB_WEIGHTS_FILE), timeout=timeout)
    except HfHubHTTPError:
        return None  # the hub answered: the download reports what it said
    except Exception as exc:  # connection refused, DNS, timeout, proxy error: no answer at all
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
    return None


def find_pretrained_weights(spec: BackboneSpec) -> Path:
    """The pretrained weights file from the local Hugging Face cache or, failing that, the hub."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(spec.hub_id, HUB_WEIGHTS_FILE)
    if isinstance(cached, str):
        return Path(cached)
    official = f"the official DINO checkpoint ({spec.official_file}) or " if spec.official_file else ""
    hint = (
        f"no pretrained weights for {spec.name}: not in the Hugging Face cache and the hub "
        f"({spec.hub_id}) is unreachable. Pass a weights file: {official}timm's {HUB_WEIGHTS_FILE} "
        f"from {spec.hub_id} (make run takes it as WEIGHTS=path/to/file make run)."
    )
    reason = _hub_unreachable(spec)
    if reason:
        raise WeightsError(f"{hint} ({reason})", setting="weights")
    try:
        return Path(hf_hub_download(spec.hub_id, HUB_WEIGHTS_FILE))
    except Exception as exc:
        raise WeightsError(f"{hint} (download failed: {str(exc).splitlines()[0]})", setting="weights") from None


def load_backbone(spec: BackboneSpec, weights: Path | None = None) -> tuple[nn.Module, str]:
    """The backbone with its pretrained weights loaded strictly, and the weights' digest."""
    path = Path(weights) if weights else find_pretrained_weights(spec)
    model = build_loaded(spec.architecture, spec.model_kwargs, read_checkpoint(path), str(path))
    return model, state_dict_digest(model.state_dict())


# --- attention ------------------------------------------------------------------------------
def has_cls_attention(model: nn.Module) -> bool:
    """Whether `cls_attention` can draw a map for this model: a ViT whose last block has
    self-attention over a patch grid, with timm's explicit-attention path (`fused_attn`, `attn_drop`)
    that `cls_attention` reads. Convolutional networks (ConvNeXt, EfficientNet, ResNet...) have none."""
    blocks = getattr(model, "blocks", None)
    stacked = isinstance(blocks, (nn.Sequential, nn.ModuleList))  # Eva (DINOv3) keeps a ModuleList
    attn = getattr(blocks[-1], "attn", None) if stacked and len(blocks) else None
    return (attn is not None and all(hasattr(attn, a) for a in ("qkv", "fused_attn", "attn_drop"))
            and hasattr(getattr(model, "patch_embed", None), "grid_size"))


def cls_attention(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and the last block's [CLS]-to-patch attention, averaged over heads, as a
    (batch, grid_h, grid_w) map, from the same forward. timm's fused attention does not return
    its weights, so the last block runs its explicit form, whose softmaxed weights pass through
    `attn_drop` (an identity in eval): read there, they include whatever the block does to q
    and k (q/k norms, DINOv3's rotary embeddings) and span the register tokens, which are
    left out of the map with [CLS] (`num_prefix_tokens`). timm's AttentionExtract does the
    same but returns no features, which would cost a second forward."""
    if not has_cls_attention(model):
        raise ValueError(f"{type(model).__name__} has no attention maps")
    attn = model.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda _m, args, _out: captured.setdefault("w", args[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        features = model(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    weights = captured["w"]  # (batch, heads, tokens, tokens)
    prefix = getattr(model, "num_prefix_tokens", 1)
    grid = model.patch_embed.grid_size
    patch_attention = weights[:, :, 0, prefix:].mean(dim=1).reshape(images.shape[0], *grid)
    return features, patch_attention.float()


# --- the forward every path runs ------------------------------------------------------------
class OnCrops(nn.Module):
    """The backbone on centre crops as they come from decoding (images.load_crop): a uint8
    batch (N, H, W, 3) in; its features out, and with `attention` the [CLS] attention map too
    (cls_attention). The normalisation after the crop is defined here only: traced into the
    exported graph (export.exported_graph) that the CPU runs for training, batch prediction and
    the service alike, and run as it is by torch on CUDA. So every path sees the same pixels."""

    def __init__(self, backbone: nn.Module, preprocessing: dict, attention: bool = False):
        super().__init__()
        self.backbone, self.attention = backbone, attention
        # (x / 255 - mean) / std as one subtraction and one division, folded into the graph
        for name in ("mean", "std"):
            values = torch.tensor(preprocessing[name], dtype=torch.float32).view(1, 3, 1, 1) * 255
            self.register_buffer(name, values, persistent=False)

    def forward(self, crops: torch.Tensor):
        images = (crops.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return cls_attention(self.backbone, images) if self.attention else self.backbone(images)
