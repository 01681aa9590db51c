"""Regenerate the figures docs/training.md and docs/audit.md show, from a real run:

    imgs/sample_grid.png        photos of each class, as the centre crop the backbone sees
    imgs/attention_banner.png   held-out test photos with the backbone's [CLS] attention and the model's answer
    imgs/learning_curves.png    the head's loss and accuracy per epoch
    imgs/confusion_matrix.png   the test split's confusion matrix
    imgs/reliability.png        reliability diagrams, before and after temperature scaling: the logits the
                                temperature was fitted on, and the test split
    imgs/audit.png              the data audit's top suspects (python -m vehicle_classifier.audit)

With real pretrained features on this project's offline machines (docs/training.md, "Figures"):

    .venv/bin/python scripts/lite0_weights.py out/tf_efficientnet_lite0.safetensors
    .venv/bin/python scripts/make_figures.py --backbone timm:tf_efficientnet_lite0 \
        --weights out/tf_efficientnet_lite0.safetensors

    .venv/bin/python scripts/make_figures.py --weights path/to/dino_deitsmall16_pretrain.pth

The model comes from --model-dir when it already holds one trained from these same photos,
weights and settings (train.py's up-to-date check); otherwise the head is trained into it first
(features come from the shared cache, so only new photos cost backbone time).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from any directory

from vehicle_classifier import UserError, config, registry

SAMPLE_DIR = config.SAMPLE_DIR
FIGURES = ("sample_grid.png", "attention_banner.png", "learning_curves.png", "confusion_matrix.png", "reliability.png",
           "audit.png")


def build_parser() -> argparse.ArgumentParser:
    default_data = config.DATA_DIR if config.DATA_DIR.is_dir() else SAMPLE_DIR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_data,
                        help=f"image folder, one sub-folder per class (default: {config.DATA_DIR} when it "
                             f"exists, else {SAMPLE_DIR})")
    parser.add_argument("--weights", type=Path, default=None,
                        help="backbone weights file (as for train.py); default: the Hugging Face cache, then the hub")
    parser.add_argument("--model-dir", type=Path, default=REPO / "out" / "figures",
                        help="model to draw from; trained here first unless it is up to date (default: out/figures)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "imgs", help="where the PNGs go (default: imgs/)")
    parser.add_argument("--backbone", default=config.TrainConfig.backbone,
                        help=f"backbone, one of {', '.join(registry.BACKBONES)} or {registry.TIMM_PREFIX}<model name> "
                             "(default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=config.FEATURE_CACHE_DIR, help="feature cache directory")
    parser.add_argument("--calibration", choices=config.CALIBRATIONS, default=config.TrainConfig.calibration,
                        help="where the temperature is fitted (as for train.py; default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=6, help="photos per class in the sample grid")
    parser.add_argument("--banner-per-class", type=int, default=3, help="photos per class in the attention banner")
    parser.add_argument("--seed", type=int, default=0, help="which photos are drawn")
    return parser


def ensure_model(args, cfg: config.TrainConfig) -> None:
    from vehicle_classifier.training.fingerprint import training_fingerprint, up_to_date

    fingerprint = training_fingerprint(args.data_dir, cfg, args.weights, "auto")
    if up_to_date(args.model_dir, fingerprint.value):
        print(f"reusing the model in {args.model_dir} (trained from these same photos, weights and settings)")
        return
    from vehicle_classifier.training.job import Job
    from vehicle_classifier.training.run import run_training

    print(f"training a model into {args.model_dir}")
    run_training(Job(args.data_dir, args.model_dir, cfg, args.weights, args.cache_dir, photos=fingerprint.photos,
                     fingerprint=fingerprint.value))


def test_photos_by_class(split: dict, seed: int) -> dict[str, list[Path]]:
    """The model's held-out test photos per class in a seeded order, then its other photos
    (a tiny dataset may hold too few test photos)."""
    from vehicle_classifier.data import Sample
    from vehicle_classifier.plots import shuffled_by_class

    root, names = Path(split["data_dir"]), split["class_names"]
    by_class = {name: [] for name in names}
    for part in ("test", "val", "train"):
        samples = [Sample(root / rel, names.index(Path(rel).parts[0])) for rel in split[part]]
        for name, paths in shuffled_by_class(samples, names, seed).items():
            by_class[name] += paths
    return by_class


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        from vehicle_classifier.registry import get_spec

        get_spec(args.backbone)  # an unknown name stops here, in one line
        cfg = config.TrainConfig(backbone=args.backbone, calibration=args.calibration)
        ensure_model(args, cfg)
        predictor = write_figures(args, cfg)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backbone = predictor.metadata["backbone"]
    test = predictor.metadata["metrics"].get("test", {})
    print(f"wrote {', '.join(str(args.out_dir / name) for name in FIGURES)}")
    print(f"model {predictor.metadata['model_version']}: {backbone['name']} weights from {backbone['weights_source']} "
          f"(digest {backbone['weights_digest'][:12]}), test accuracy {test.get('accuracy')}")
    return 0


def write_figures(args, cfg: config.TrainConfig):
    """Every figure in FIGURES, from the model in args.model_dir (and an audit run on it); the
    model's Predictor."""
    from vehicle_classifier.data import scan_image_folder
    from vehicle_classifier.plots import (
        attention_banner,
        sample_grid,
        save_figure,
        shuffled_by_class,
    )
    from vehicle_classifier.model.predictor import Predictor
    from vehicle_classifier.fileio import write_file
    from vehicle_classifier.training.metrics import plot_confusion_matrix, plot_learning_curves

    predictor = Predictor.from_dir(args.model_dir)
    out = args.out_dir
    class_names, samples = scan_image_folder(args.data_dir)
    save_figure(sample_grid(shuffled_by_class(samples, class_names, args.seed), args.per_class,
                            predictor.model.preprocessing), out / FIGURES[0])

    split = json.loads((args.model_dir / config.SPLIT_FILE).read_text())
    if predictor.attention_available:
        save_figure(attention_banner(predictor, test_photos_by_class(split, args.seed), args.banner_per_class),
                    out / FIGURES[1])
    else:
        logging.info("no %s: this backbone has no attention maps (a CNN such as ConvNeXt)", FIGURES[1])

    metrics = json.loads((args.model_dir / config.METRICS_FILE).read_text())
    plot_learning_curves(metrics["history"], metrics["summary"]["best_epoch"], out / FIGURES[2])
    plot_confusion_matrix(metrics["test"]["confusion_matrix"], class_names, out / FIGURES[3],
                          f"test split ({metrics['test']['count']} photos)")
    # Drawn by training, which has every bin.
    write_file(out / FIGURES[4], (args.model_dir / config.RELIABILITY_PLOT).read_bytes())
    write_audit_sheet(args, cfg, out)
    return predictor


def write_audit_sheet(args, cfg: config.TrainConfig, out: Path) -> None:
    from vehicle_classifier.audit.run import run_audit
    from vehicle_classifier.fileio import write_file

    run_audit(args.data_dir, args.model_dir / config.AUDIT_DIR, cfg, args.weights, args.cache_dir)
    write_file(out / FIGURES[5], (args.model_dir / config.AUDIT_DIR / config.AUDIT_SHEET).read_bytes())


if __name__ == "__main__":
    sys.exit(main())
