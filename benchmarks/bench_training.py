"""Training benchmark: train.py against one plain fp32-eager PyTorch pass over the same photos.

    .venv/bin/python benchmarks/bench_training.py [--photos 600]

Builds a photo folder from ../shared/data/car-bike-sample (symlinks, plus mirrored re-encodes
when more photos are asked for than the sample has), writes random ViT-S/16 weights in the
official DINO format, then measures in one run:
  1. one fp32-eager backbone pass, decode included, written as a user would with plain
     PyTorch + torchvision (batched like train.py, and at batch 1);
  2. the first `train.py` run (empty feature cache), as a subprocess, start-up included;
  3. the unchanged rerun (finds its artifact up to date);
  4. the forced rerun (--force: head retrained from cached features, backbone not run).
Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO))

from vehicle_classifier import config  # noqa: E402
from vehicle_classifier.backbone import create_backbone  # noqa: E402

SAMPLE_DIR = config.SAMPLE_DIR


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


def fp32_eager_pass(model, paths: list[Path], batch_size: int) -> float:
    """What plain PyTorch does: PIL decode, torchvision transforms, fp32 forward."""
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    transform = transforms.Compose([
        transforms.Resize(int(size / cfg["crop_pct"]), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(cfg["mean"], cfg["std"]),
    ])
    started = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, len(paths), batch_size), desc=f"fp32 eager, batch {batch_size}", unit="batch"):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            model(batch)
    return time.perf_counter() - started


def timed_train(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"train.py failed:\n{result.stderr[-2000:]}")
    return elapsed, result.stdout.strip().splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=600, help="how many photos to time on")
    parser.add_argument("--skip-batch1", action="store_true", help="skip the batch-1 fp32 pass")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        tmp = Path(tmp)
        paths = build_photo_folder(tmp / "photos", args.photos)
        torch.manual_seed(0)
        model = create_backbone(config.BACKBONES["dino-vits16"].architecture)
        weights = tmp / "dino_deitsmall16_pretrain.pth"
        torch.save(model.state_dict(), weights)
        print(f"{len(paths)} photos; ViT-S/16 with random weights (official DINO format); "
              f"{torch.get_num_threads()} torch threads; torch {torch.__version__}")

        batch = config.TrainConfig().extract_batch_size
        fp32_batched = fp32_eager_pass(model, paths, batch)
        fp32_single = None if args.skip_batch1 else fp32_eager_pass(model, paths, 1)
        del model

        train_args = ["--data-dir", str(tmp / "photos"), "--weights", str(weights),
                      "--output-dir", str(tmp / "out"), "--cache-dir", str(tmp / "cache")]
        first, first_line = timed_train(train_args)
        rerun, rerun_line = timed_train(train_args)
        forced, _ = timed_train([*train_args, "--force"])

    rows = [
        (f"fp32 eager pass, batch {batch} (decode included)", fp32_batched),
        *([("fp32 eager pass, batch 1 (decode included)", fp32_single)] if fp32_single else []),
        ("train.py, first run (empty cache, start-up included)", first),
        ("train.py, unchanged rerun (up to date)", rerun),
        ("train.py --force (head retrained from cached features)", forced),
    ]
    print()
    for name, seconds in rows:
        print(f"{name:<58} {seconds:8.2f} s")
    print(f"\n  first run:        {first_line}\n  unchanged rerun:  {rerun_line[:90]}...")
    print(f"\nratios to the batch-{batch} fp32 pass (targets: first <= 0.6, rerun <= 0.1)")
    print(f"  first run        {first / fp32_batched:.3f}")
    print(f"  unchanged rerun  {rerun / fp32_batched:.3f}")
    print(f"  forced rerun     {forced / fp32_batched:.3f}")
    if fp32_single:
        print("ratios to the batch-1 fp32 pass")
        print(f"  first run        {first / fp32_single:.3f}")
        print(f"  unchanged rerun  {rerun / fp32_single:.3f}")
        print(f"  forced rerun     {forced / fp32_single:.3f}")


if __name__ == "__main__":
    main()
