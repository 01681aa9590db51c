"""vehicle-audit (or python -m vehicle_classifier.audit) --data-dir D --output-dir O: audit an image folder (see
the package's docstring); a short summary on the terminal, the details in O/audit.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .. import cli, config

SHOWN = 5  # suspects listed on the terminal


def build_parser() -> argparse.ArgumentParser:
    defaults = config.TrainConfig()
    parser = argparse.ArgumentParser(prog="vehicle-audit", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_flags(parser, "data_dir")
    parser.add_argument("--output-dir", type=Path, default=config.AUDIT_DIR,
                        help=f"where {config.AUDIT_FILE} and {config.AUDIT_SHEET} go")
    cli.add_flags(parser, "backbone", "weights", "cache_dir", "device", "precision", "extract_batch_size")
    for name in ("seed", "val_fraction", "test_fraction"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name),
                            help=f"train.py's --{name.replace('_', '-')}: the split whose crossings are reported")
    return parser


def summary(report: dict, output_dir: Path) -> list[str]:
    issues = [item for item in report["label_issues"] if item["issue"]]
    crossing = sum(pair["crosses_split"] for pair in report["near_duplicates"])
    lines = [f"{report['photos']} photos audited in {report['seconds']} s ({len(report['unreadable'])} unreadable): "
             f"{len(issues)} label issues, {len(report['near_duplicates'])} near-duplicate pairs "
             f"({crossing} across train.py's split), {len(report['outliers'])} outliers"]
    lines += [f"  {item['path']}: filed as {item['given']}, looks like {item['suggested']} (label quality "
              f"{item['score']:.2f})" for item in issues[:SHOWN]]
    lines += [f"  {a} ~ {b} (similarity {pair['similarity']:.2f}{', across the split' if pair['crosses_split'] else ''})"
              for pair in report["near_duplicates"][:SHOWN] for a, b in [pair["paths"]]]
    lines.append(f"written: {output_dir / config.AUDIT_FILE}, {output_dir / config.AUDIT_SHEET}")
    return lines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from .. import UserError
    from ..training.fetch import ensure_dataset
    from .run import run_audit

    cfg = config.TrainConfig(backbone=args.backbone, precision=args.precision, seed=args.seed,
                             extract_batch_size=args.extract_batch_size, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction)
    try:
        ensure_dataset(args.data_dir)
        report = run_audit(args.data_dir, args.output_dir, cfg, args.weights, args.cache_dir, args.device)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written; the features extracted so far are kept in the cache", file=sys.stderr)
        return 130
    print("\n".join(summary(report, args.output_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
