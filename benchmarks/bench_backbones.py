"""CPU cost of each registered backbone, as the product runs it: the batch-1 and batch-16 forward.

    .venv/bin/python benchmarks/bench_backbones.py [--backbones dino-vits16 dinov2-vits14 ...] [--repeats 5]

For every backbone in registry.BACKBONES (random weights: the cost of pretrained ones is the
same), at its own input size: OpenVINO (what training and the service run on CPU) with one
stream over all cores, ms for one image and ms per image in a batch of 16, and the fidelity of
its [CLS] features to torch fp32 (min cosine over 4 images), so that a backbone the fast runtime
cannot handle shows here. Backbones are timed round-robin, best of the rounds (--repeats). Extra rows price the input sizes not chosen: DINOv2 at the 518 px its
position grid was trained at, DINOv3 ViT-S/16 at 224 px. Prints a markdown table and ratios to
dino-vits16, measured in this one run; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]

from vehicle_classifier import registry
from vehicle_classifier.backbone import OnCrops, create_backbone, preprocessing_for
from vehicle_classifier.runtime import resolve_precision
from vehicle_classifier.export import exported_graph
from vehicle_classifier.runtime import OpenVINOModel

# Input sizes not chosen, priced for the justification in docs/backbones.md.
ALTERNATIVES = {
    "dinov2-vits14 @ 518 px": replace(registry.BACKBONES["dinov2-vits14"], model_kwargs={}),
    "dinov3-vits16 @ 224 px": replace(registry.BACKBONES["dinov3-vits16"], model_kwargs={
        **registry.DINOV3_CLS, "pretrained_cfg_overlay": {"input_size": [3, 224, 224], "crop_pct": 0.875}}),
}


def prepared(spec: registry.BackboneSpec, precision: str) -> dict:
    """The backbone converted and compiled for OpenVINO as the service runs it (the exported
    graph: uint8 crops in), with its fidelity to torch fp32 (backbone.OnCrops, eager)."""
    torch.manual_seed(0)
    model = create_backbone(spec.architecture, spec.model_kwargs).eval()
    preprocessing = preprocessing_for(model)
    size = preprocessing["input_size"]
    fast = OpenVINOModel(exported_graph(model, preprocessing), precision, mode="latency")
    fast.compile()
    batch = torch.randint(0, 256, (16, size, size, 3), dtype=torch.uint8)
    with torch.inference_mode():
        reference = OnCrops(model, preprocessing)(batch[:4])
    batch = batch.numpy()
    fast(batch[:1]), fast(batch)  # the first call at each shape selects kernels: not timed
    served = torch.from_numpy(fast(batch[:4])[0])
    return {
        "fast": fast, "batch": batch, "size": size, "b1": [], "b16": [],
        "params": sum(p.numel() for p in model.parameters()) / 1e6,
        "cosine": float(torch.nn.functional.cosine_similarity(served, reference).min()),
    }


def timed_ms(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=[*registry.BACKBONES, *ALTERNATIVES],
                        help="which to measure (default: all registered, then the alternative input sizes)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timing rounds: batch-1 and batch-16 calls per backbone (default: 5)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()
    precision = resolve_precision(args.precision, "cpu")
    specs = {name: registry.BACKBONES.get(name) or ALTERNATIVES[name] for name in args.backbones}
    print(f"OpenVINO {precision}, one stream over {torch.get_num_threads()} threads; random weights\n")
    rows = {name: prepared(spec, precision) for name, spec in tqdm(specs.items(), desc="converting", unit="backbone")}
    # Round-robin, best of the rounds: on a shared machine the load changes from one minute to
    # the next, and interleaving gives every backbone the same conditions.
    for _ in tqdm(range(args.repeats), desc="timing rounds", unit="round"):
        for r in rows.values():
            r["b1"].append(timed_ms(r["fast"], r["batch"][:1]))
            r["b16"].append(timed_ms(r["fast"], r["batch"]) / 16)
    for r in rows.values():
        r["b1"], r["b16"] = min(r["b1"]), min(r["b16"])
    base = rows.get("dino-vits16")
    print("| backbone | input px | params (M) | batch 1, ms | batch 16, ms/image | vs dino-vits16 (b1) "
          "| min cosine to torch fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        ratio = f"{r['b1'] / base['b1']:.2f}x" if base else "-"
        print(f"| {name} | {r['size']} | {r['params']:.1f} | {r['b1']:.1f} | {r['b16']:.1f} | {ratio} "
              f"| {r['cosine']:.5f} |")


if __name__ == "__main__":
    main()
