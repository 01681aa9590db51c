"""int8 against the float forwards of the ViT-S/16 backbone on this CPU, in one run:

    .venv/bin/python benchmarks/bench_int8.py [--photos 400] [--repeats 30]

torch eager fp32 (the baseline), OpenVINO bf16 (on CPUs that have it), OpenVINO fp32 and the
NNCF int8 graph (training.int8: calibrated on config.INT8_CALIBRATION_CROPS crops of half the
sample photos), batch 1, median ms over --repeats and the ratio to torch eager fp32; and the int8
graph's fidelity on the other half: feature cosine to fp32 (median, min) and top-1 agreement of
a linear probe fitted on the fp32 features of the calibration half (random weights: a stand-in
for the head). Prints the CPU's flags and which precision 'auto' would choose. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vehicle_classifier import config
from vehicle_classifier.backbone import create_backbone, preprocessing_for
from vehicle_classifier.images import preprocess
from vehicle_classifier.runtime import (OpenVINOModel, _cpu_flags, cpu_supports_bf16,
                                        cpu_supports_int8, resolve_precision)
from vehicle_classifier.training.int8 import crops, quantized_graphs

SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def median_ms(forward, repeats: int) -> float:
    forward()  # the first call compiles and warms up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def probe_agreement(train: np.ndarray, exact: np.ndarray, fast: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 agreement of a least-squares linear probe (fitted on fp32 train features)."""
    weights, *_ = np.linalg.lstsq(np.c_[train, np.ones(len(train))], np.eye(2)[labels], rcond=None)
    answer = lambda f: (np.c_[f, np.ones(len(f))] @ weights).argmax(1)  # noqa: E731
    return float((answer(exact) == answer(fast)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    flags = _cpu_flags()
    print("CPU flags:", " ".join(f for f in SHOWN_FLAGS if f in flags) or f"none of {', '.join(SHOWN_FLAGS)}")
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch16_224.dino").eval()
    preprocessing = preprocessing_for(backbone)
    photos = sorted(p for p in config.SAMPLE_DIR.glob("*/*") if p.is_file())[: args.photos]
    started = time.perf_counter()
    graphs = quantized_graphs(backbone, preprocessing, photos[0::2])
    print(f"quantization (NNCF, calibration included): {time.perf_counter() - started:.1f} s")
    one = crops(photos[1:2], preprocessing)
    tensor = preprocess(__import__("PIL.Image").Image.fromarray(one[0]), preprocessing)[None]
    forwards = {"torch eager fp32": lambda: backbone(tensor)}
    for name, graph, precision in (("openvino fp32", graphs[0], "fp32"), ("openvino bf16", graphs[0], "bf16"),
                                   ("openvino int8", graphs[1], "int8")):
        if precision != "bf16" or cpu_supports_bf16():
            model = OpenVINOModel(graph, precision)
            forwards[name] = lambda model=model: model(one)
    with torch.inference_mode():
        times = {name: median_ms(forward, args.repeats) for name, forward in forwards.items()}
    print("\n| forward, batch 1 | ms (median) | ratio to torch eager fp32 |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.1f} | {ms / times['torch eager fp32']:.2f}x |")
    fidelity(graphs, photos, preprocessing)
    print(f"\n'auto' on this CPU with the gate held: {resolve_precision('auto', 'cpu', int8_gate=True)}"
          f" (int8 dot products: {cpu_supports_int8()}, bf16: {cpu_supports_bf16()})")


def fidelity(graphs: tuple, photos: list[Path], preprocessing: dict) -> None:
    """int8 against fp32 on the photos not used for calibration."""
    exact_model, fast_model = OpenVINOModel(graphs[0], "fp32"), OpenVINOModel(graphs[1], "int8")
    train, held = photos[0::2], photos[1::2]
    features = lambda model, paths: np.concatenate(  # noqa: E731
        [model(crops(paths[i:i + 16], preprocessing)) for i in range(0, len(paths), 16)])
    exact, fast, train_features = features(exact_model, held), features(fast_model, held), features(exact_model, train)
    cosine = (exact * fast).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(fast, axis=1))
    label = lambda paths: np.array([p.parent.name == "Car" for p in paths], dtype=int)  # noqa: E731
    agreement = probe_agreement(train_features, exact, fast, label(train))
    print(f"\nint8 fidelity on {len(held)} held-out photos (random weights): feature cosine median "
          f"{np.median(cosine):.5f}, min {cosine.min():.5f}; linear-probe top-1 agreement {agreement:.2%}")


if __name__ == "__main__":
    main()
