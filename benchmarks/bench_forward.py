"""The batch-1 backbone forward of each CPU option, side by side, and each one's fidelity to fp32:

    .venv/bin/python benchmarks/bench_forward.py [--photos 0] [--repeats 30] [--train-per-class 40] [--compile]

Builds the ViT-S/16 random-weights artifact (common.build_artifact: training also publishes the
exported graph, backbone.xml, and the NNCF-quantized one, backbone-int8.xml), then times, on the
held-out sample photos' uint8 centre crops (the service's decode and crop):
  - fp32 eager torch, the baseline: the artifact's backbone behind the preprocessing (common.eager_fp32);
  - torch bf16 autocast of the same module (and with --compile, torch.compile + freezing + bf16);
  - OpenVINO fp32 and bf16 (bf16 only where the CPU has it), and int8 (backbone-int8.xml), each
    as Predictor.from_dir(precision=...) serves it: predictor.forward;
  - the served default: Predictor.from_dir with precision auto, with the line it logs saying why
    (int8 needs training's fidelity gate and int8 dot products, runtime.cpu_supports_int8()).
Fidelity of each against fp32 eager over every held-out photo (or --photos of them), the answers
through the service's own head and temperature (predict_features): top-1 agreement, max |dp|,
and the feature cosine (median, min). Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common import (build_artifact, cpu_flags_line, crops_of, describe, eager_fp32, held_out, served_features,
                    timed)
from vehicle_classifier import config
from vehicle_classifier.model.predictor import Predictor
from vehicle_classifier.runtime import cpu_supports_bf16, cpu_supports_int8

OPTIONS = (("OpenVINO fp32", "fp32"), ("OpenVINO bf16", "bf16"), ("OpenVINO int8 (backbone-int8.xml)", "int8"))


@dataclass
class Row:
    name: str
    ms: float
    fidelity: str = ""
    note: str = ""


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def served_default(model_dir: Path) -> tuple[Predictor, str]:
    """Predictor.from_dir with precision auto, and the line it logs saying what it serves and why;
    not yet warmed up (nothing compiled), so that the torch options are timed before any OpenVINO
    thread pool exists in this process."""
    logger, handler = logging.getLogger("vehicle_classifier"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        predictor = Predictor.from_dir(model_dir, warm_up=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    why = next((line for line in handler.lines if line.startswith("serving")), "the predictor logged no reason")
    return predictor, why


def answers(predictor: Predictor, forward, inputs: list, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, probabilities) of `forward` on every input, the probabilities from the service's
    head and temperature: every option is judged by what a user would be shown."""
    features = []
    with torch.inference_mode():
        for x in tqdm(inputs, desc=desc, unit="img", leave=False, mininterval=2):
            out = forward(x)
            features.append(out.float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out))
    features = np.concatenate(features)
    found = predictor.predict_features(features)
    return features, np.array([[a.probabilities[n] for n in predictor.model.class_names] for a in found])


def fidelity(features: np.ndarray, probs: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> str:
    exact, exact_probs = reference
    agree = int((probs.argmax(1) == exact_probs.argmax(1)).sum())
    cosine = (exact * features).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(features, axis=1))
    return (f"{agree}/{len(probs)} | {np.abs(probs - exact_probs).max():.4f} | "
            f"{np.median(cosine):.5f} / {cosine.min():.5f}")


def bf16(fn):
    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x)
    return run


def measure(name: str, forward, inputs: list, judge: Predictor, reference, repeats: int, note: str = "") -> Row:
    with torch.inference_mode():
        ms = timed(forward, inputs, repeats, desc=name)
    return Row(name, ms, fidelity(*answers(judge, forward, inputs, name), reference), note)


def option_rows(model_dir: Path, crops: list, judge: Predictor, reference, repeats: int) -> list[Row]:
    """OpenVINO fp32, bf16 and int8 as the predictor serves each (precision=...)."""
    rows = []
    for name, precision in OPTIONS:
        if precision == "bf16" and not cpu_supports_bf16():
            rows.append(Row(name, float("nan"), note="skipped: no AVX512-BF16 or AMX on this CPU"))
            continue
        if precision == "int8" and not (model_dir / config.INT8_FILES[0]).is_file():
            rows.append(Row(name, float("nan"), note=f"skipped: training wrote no {config.INT8_FILES[0]}"))
            continue
        predictor = Predictor.from_dir(model_dir, precision=precision)
        note = ("no int8 dot products on this CPU (cpu_supports_int8() False): slower than it would be"
                if precision == "int8" and not cpu_supports_int8() else "")
        rows.append(measure(name, served_features(predictor), crops, judge, reference, repeats, note))
        del predictor
    return rows


def compiled_row(eager, tensors: list, judge: Predictor, reference, repeats: int) -> Row:
    """torch.compile (inductor, frozen weights) under bf16 autocast; its compile time in the note."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = bf16(torch.compile(copy.deepcopy(eager)))
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(tensors[0])
    note = f"compile {time.perf_counter() - start:.0f} s"
    return measure("torch.compile + freezing + bf16", compiled, tensors, judge, reference, repeats, note)


def run_forward(model_dir: Path, photos: list[Path], repeats: int, with_compile: bool = False) -> dict:
    """Every option's row; returns the figures the driver's table needs."""
    served, why = served_default(model_dir)
    crops = crops_of(served, photos, "decoding held-out photos")
    tensors = [torch.from_numpy(c) for c in crops]
    eager = eager_fp32(model_dir)
    with torch.inference_mode():
        fp32_ms = timed(eager, tensors, repeats, desc="fp32 eager")
    reference = answers(served, eager, tensors, "fp32 reference")
    rows = [Row("fp32 eager torch (baseline)", fp32_ms, "– | – | –"),
            measure("torch bf16 autocast", bf16(eager), tensors, served, reference, repeats)]
    if with_compile:
        rows.append(compiled_row(eager, tensors, served, reference, repeats))
    served.warm_up()  # the torch options are timed: OpenVINO may start its threads now
    rows += option_rows(model_dir, crops, served, reference, repeats)
    served_row = measure(f"served default: {describe(served)}", served_features(served), crops, served,
                         reference, repeats, why)
    rows.append(served_row)
    print_rows(rows, len(photos), fp32_ms)
    return {"fp32_ms": fp32_ms, "served_ms": served_row.ms, "served": describe(served), "why": why}


def print_rows(rows: list[Row], photos: int, fp32_ms: float) -> None:
    print(f"\nbatch-1 backbone forward, {photos} held-out sample photos, {torch.get_num_threads()} torch threads; "
          f"fidelity to fp32 eager through the service's head and temperature:\n")
    print("| batch-1 forward | ms (median) | time / fp32 eager | top-1 agreement | max \\|Δp\\| | "
          "feature cosine median / min | note |\n|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row.ms / fp32_ms:.2f}×" if row.ms == row.ms else "–"
        ms = f"{row.ms:.1f}" if row.ms == row.ms else "–"
        print(f"| {row.name} | {ms} | {ratio} | {row.fidelity or '– | – | –'} | {row.note} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--photos", type=int, default=0, help="held-out sample photos to time and judge (0: all)")
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per option")
    parser.add_argument("--train-per-class", type=int, default=40, help="photos per class to train the head on")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    print(cpu_flags_line())
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as work:
        model_dir = build_artifact(Path(work), args.train_per_class)
        run_forward(model_dir, held_out(args.train_per_class, args.photos), args.repeats, args.compile)


if __name__ == "__main__":
    main()
