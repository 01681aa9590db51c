"""Where to fit the temperature, measured on real pretrained features (docs/training.md, "Calibration").

    .venv/bin/python scripts/lite0_weights.py out/tf_efficientnet_lite0.safetensors
    .venv/bin/python benchmarks/calibration_study.py --weights out/tf_efficientnet_lite0.safetensors

Features of the 400 sample photos come from the feature cache (extracted once). Two parts:
  1. The choice, made without the test split: the default split's train+val photos (340) are
     re-split, --resplits times, into train/val/pseudo-test (70/15/15); on each, the head is
     trained as train.py trains it and its pseudo-test predictions are scored with no temperature,
     with T fitted on the head's validation logits (--calibration val) and with T
     fitted on 5-fold out-of-fold logits of train+val (--calibration out-of-fold, the default). Prints the mean ECE, log-loss
     and Brier score, how often ECE after <= ECE before, and ECE over all resplits pooled.
  2. The goal, reported: the real test split for seeds 0..--seeds-1 (split and head), ECE before
     and after, with a bootstrap 95% interval of the difference (test photos resampled).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

from vehicle_classifier import config, registry
from vehicle_classifier.data import stratified_split
from vehicle_classifier.devices import torch_threads
from vehicle_classifier.training.metrics import calibration_error
from vehicle_classifier.training.calibration import fit_temperature, out_of_fold_logits
from vehicle_classifier.training.head_training import train_head
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import extract, readable

METHODS = ("none", "val", "out-of-fold")


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return calibration_error(labels.numpy(), (logits / temperature).softmax(1).numpy(), config.CALIBRATION_BINS)["ece"]


def load_features(args) -> tuple[torch.Tensor, torch.Tensor]:
    job = Job(args.data_dir, cfg=config.TrainConfig(backbone=args.backbone), weights=args.weights,
              cache_dir=args.cache_dir, device="cpu")
    data = readable(extract(job), job.cfg)  # the run's first stages only: nothing is published
    return data.features.float(), data.labels


def fit(x: torch.Tensor, y: torch.Tensor, split: dict, seed: int) -> tuple[dict, dict, float]:
    """The head trained as train.py trains it on `split`, its logits per part, each method's
    temperature, and the seconds the out-of-fold heads took."""
    cfg = config.TrainConfig(seed=seed)
    part = {name: (x[idx], y[idx]) for name, idx in split.items()}
    trained = train_head(*part["train"], *part["val"], 2, cfg, progress=False)
    head, best_epoch = trained.head, trained.best_epoch
    with torch.no_grad():
        logits = {name: head(xx) for name, (xx, _) in part.items()}
    pool_x, pool_y = (torch.cat([part["train"][i], part["val"][i]]) for i in (0, 1))
    started = time.perf_counter()
    held_out = out_of_fold_logits(pool_x, pool_y, 2, best_epoch, cfg)
    seconds = time.perf_counter() - started
    temperatures = {"none": 1.0, "val": fit_temperature(logits["val"], part["val"][1]),
                    "out-of-fold": fit_temperature(held_out, pool_y)}
    return {name: (logits[name], part[name][1]) for name in part}, temperatures, seconds


def choose(x: torch.Tensor, y: torch.Tensor, resplits: int) -> None:
    """Part 1: the default split's train+val photos only, re-split into train/val/pseudo-test."""
    default = stratified_split(y.tolist(), config.TrainConfig.val_fraction, config.TrainConfig.test_fraction, 0)
    pool = torch.tensor(default["train"] + default["val"])
    x, y = x[pool], y[pool]
    scores = {m: [] for m in METHODS}
    pooled = {m: [] for m in METHODS}
    for r in range(resplits):
        split = stratified_split(y.tolist(), 0.15, 0.15, 1000 + r)
        logits, temperatures, seconds = fit(x, y, split, 1000 + r)
        test_logits, test_y = logits["test"]
        for m, t in temperatures.items():
            brier = ((test_logits / t).softmax(1) - F.one_hot(test_y, 2)).pow(2).sum(1).mean()
            scores[m].append((t, ece(test_logits, test_y, t), float(F.cross_entropy(test_logits / t, test_y)),
                              float(brier)))
            pooled[m].append((test_logits / t, test_y))
        print(f"resplit {r:2d}: T val {temperatures['val']:.2f}, out-of-fold {temperatures['out-of-fold']:.2f} "
              f"({seconds:.2f} s)", flush=True)
    print(f"\n{len(pool)} train+val photos, {resplits} resplits; pseudo-test ({len(split['test'])} photos):")
    print(f"{'T fitted on':12} {'median T':>9} {'ECE':>7} {'log-loss':>9} {'Brier':>7} {'ECE<=none':>10} {'pooled ECE':>11}")
    for m in METHODS:
        t, e, nll, brier = map(np.array, zip(*scores[m]))
        wins = int((e <= np.array([s[1] for s in scores["none"]]) + 1e-12).sum())
        logits, labels = (torch.cat(parts) for parts in zip(*pooled[m]))
        print(f"{m:12} {np.median(t):9.2f} {e.mean():7.4f} {nll.mean():9.4f} {brier.mean():7.4f} "
              f"{wins:>6}/{resplits:<3} {ece(logits, labels, 1.0):11.4f}")


def report(x: torch.Tensor, y: torch.Tensor, seeds: int, draws: int) -> None:
    """Part 2: the real test split, for each seed (split and head), with the chosen method."""
    rng = np.random.default_rng(0)
    print(f"\nreal test split, T fitted on out-of-fold logits; bootstrap 95% interval of ECE after - before ({draws} draws):")
    for seed in range(seeds):
        cfg = config.TrainConfig()
        logits, temperatures, _ = fit(x, y, stratified_split(y.tolist(), cfg.val_fraction, cfg.test_fraction, seed), seed)
        t = temperatures["out-of-fold"]
        (test_logits, test_y), (val_logits, val_y) = logits["test"], logits["val"]
        diffs = []
        for _ in range(draws):
            i = torch.from_numpy(rng.integers(0, len(test_y), len(test_y)))
            diffs.append(ece(test_logits[i], test_y[i], t) - ece(test_logits[i], test_y[i], 1.0))
        errors = int((test_logits.argmax(1) != test_y).sum())
        print(f"seed {seed}: T {t:.2f}, test ECE {ece(test_logits, test_y, 1.0):.4f} -> {ece(test_logits, test_y, t):.4f} "
              f"({errors} errors; interval {np.percentile(diffs, 2.5):+.4f} to {np.percentile(diffs, 97.5):+.4f}), "
              f"val ECE {ece(val_logits, val_y, 1.0):.4f} -> {ece(val_logits, val_y, t):.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="timm-format weights (scripts/lite0_weights.py)")
    parser.add_argument("--backbone", default=f"{registry.TIMM_PREFIX}tf_efficientnet_lite0")
    parser.add_argument("--data-dir", type=Path, default=config.SAMPLE_DIR)
    parser.add_argument("--cache-dir", type=Path, default=config.FEATURE_CACHE_DIR)
    parser.add_argument("--resplits", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    x, y = load_features(args)
    with torch_threads(1):  # as training runs the head
        choose(x, y, args.resplits)
        report(x, y, args.seeds, args.bootstrap)


if __name__ == "__main__":
    main()
