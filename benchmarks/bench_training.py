"""Training and batch-prediction benchmark: train.py and the batch CLI against the plainest loop
a user would write, over the same photos on the same device (CUDA when present), in one run.

    .venv/bin/python benchmarks/bench_training.py [--photos N] [--device auto|cpu|cuda]

Builds a photo folder from ../shared/data/car-bike-sample (symlinks, plus mirrored re-encodes
when more photos are asked for than the sample has), writes random ViT-S/16 weights in the
official DINO format, then measures:
  1. the naive loop: PIL decode in the main process, torchvision Resize/CenterCrop/Normalize,
     fp32 eager forward, batch 32, on the device (and at batch 1 on CPU, unless skipped);
  2. the first `train.py` run (empty feature cache), as a subprocess, start-up included, and its
     feature-extraction phase (from metrics.json);
  3. the unchanged rerun (finds its artifact up to date);
  4. the forced rerun (--force: head retrained from cached features, backbone not run);
  5. batch prediction over the same photos (`python -m vehicle_classifier.offline.batch`, fresh output).
Prints seconds and each as a ratio to the naive loop; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision import transforms
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]

from vehicle_classifier import config, registry
from vehicle_classifier.backbone import create_backbone

SAMPLE_DIR = config.SAMPLE_DIR
NAIVE_BATCH = 32


def build_photo_folder(root: Path, count: int) -> list[Path]:
    by_class = [sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(SAMPLE_DIR.glob("*/"))]
    photos = [p for group in zip(*by_class) for p in group]  # classes interleaved
    if not photos:
        sys.exit(f"no sample photos at {SAMPLE_DIR}")
    made = []
    for i in range(count):
        source = photos[i % len(photos)]
        target = root / source.parent.name / (source.stem + (f"_mirror{i // len(photos)}.jpg" if i >= len(photos) else source.suffix))
        target.parent.mkdir(parents=True, exist_ok=True)
        if i < len(photos):
            target.symlink_to(source)
        else:  # a different file (content), the same kind of photo
            with Image.open(source) as im:
                ImageOps.mirror(im.convert("RGB")).save(target, quality=92)
        made.append(target)
    return made


def naive_loop(model, paths: list[Path], batch_size: int, device: torch.device) -> float:
    """What plain PyTorch does: PIL decode, torchvision transforms, fp32 forward, in one process."""
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    transform = transforms.Compose([
        transforms.Resize(int(size / cfg["crop_pct"]), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(cfg["mean"], cfg["std"]),
    ])
    model = model.to(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, len(paths), batch_size), desc=f"naive loop, batch {batch_size}", unit="batch"):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            model(batch.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def timed(args: list[str]) -> tuple[float, str]:
    """Seconds a command of this repository's Python takes, and its first line of output."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{' '.join(args[:2])} failed:\n{result.stderr[-2000:]}")
    return elapsed, (result.stdout.strip().splitlines() or [""])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=0, help="how many photos to time on (default: 1800 on CUDA, "
                                                              "600 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--skip-batch1", action="store_true", help="skip the batch-1 naive loop (CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    count = args.photos or (1800 if device.type == "cuda" else 600)

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        tmp = Path(tmp)
        paths = build_photo_folder(tmp / "photos", count)
        torch.manual_seed(0)
        model = create_backbone(registry.BACKBONES["dino-vits16"].architecture)
        weights = tmp / "dino_deitsmall16_pretrain.pth"
        torch.save(model.state_dict(), weights)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"{len(paths)} photos; ViT-S/16 with random weights (official DINO format); {device} ({where}); "
              f"torch {torch.__version__}")

        naive = naive_loop(model, paths, NAIVE_BATCH, device)
        naive_single = None if args.skip_batch1 or device.type == "cuda" else naive_loop(model, paths, 1, device)
        del model
        rows, lines = time_the_commands(tmp, weights, device)
    report(naive, naive_single, rows)
    print(f"\n  first run:        {lines[0]}\n  unchanged rerun:  {lines[1][:90]}...\n  batch:            "
          f"{lines[2]}")


def time_the_commands(tmp: Path, weights: Path, device: torch.device) -> tuple[list, list[str]]:
    """train.py (first run, unchanged rerun, --force) and batch prediction on the photos in
    `tmp`: the report's rows, and the first line each of the first run, the rerun and batch printed."""
    train_args = ["train.py", "--data-dir", str(tmp / "photos"), "--weights", str(weights), "--device", str(device),
                  "--output-dir", str(tmp / "out"), "--cache-dir", str(tmp / "cache")]
    first, first_line = timed(train_args)
    extraction = json.loads((tmp / "out" / config.METRICS_FILE).read_text())["summary"]["extract_seconds"]
    rerun, rerun_line = timed(train_args)
    forced, _ = timed([*train_args, "--force"])
    predicted, predicted_line = timed(["-m", "vehicle_classifier.offline.batch", str(tmp / "photos"), "--model-dir",
                                       str(tmp / "out"), "--output", str(tmp / "predictions.csv"),
                                       "--device", str(device)])
    rows = [
        ("feature extraction phase of the first run", extraction, 0.3),
        ("train.py, first run (empty cache, start-up included)", first, 0.6),
        ("train.py, unchanged rerun (up to date)", rerun, None),
        ("train.py --force (head retrained from cached features)", forced, 0.4),
        ("batch prediction, python -m vehicle_classifier.offline.batch", predicted, 0.35),
    ]
    return rows, [first_line, rerun_line, predicted_line]


def report(naive: float, naive_single: float | None, rows: list[tuple[str, float, float | None]]) -> None:
    print(f"\n{'naive loop, batch ' + str(NAIVE_BATCH) + ' (decode included)':<62} {naive:8.2f} s")
    if naive_single:
        print(f"{'naive loop, batch 1 (decode included)':<62} {naive_single:8.2f} s")
    print(f"\n{'':<62} {'seconds':>8}  {'vs naive':>8}  {'CUDA target':>11}" + ("  vs batch 1" if naive_single else ""))
    for name, seconds, target in rows:
        line = f"{name:<62} {seconds:8.2f}  {seconds / naive:8.3f}  {'<= ' + str(target) if target else '':>11}"
        print(line + (f"  {seconds / naive_single:10.3f}" if naive_single else ""))


if __name__ == "__main__":
    main()
