"""Ask the prediction service about photos and print, per photo, the label and its confidence, or
"neither a car nor a bike?" when the photo is unlike every training photo.

    python test.py [IMAGE_OR_FOLDER ...] [--url URL]

With no image it sends the first photo it finds under data/Car-Bike-Dataset/. Exit status 0 when
every photo got an answer, 1 (with one readable line on stderr per problem) otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vehicle_classifier import config
from vehicle_classifier.data import image_files
from vehicle_classifier.client import PREDICT_TIMEOUT, PredictionClient, ServiceError, service_url


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", type=Path,
                        help=f"photos or folders of photos (default: the first photo under {config.DATA_DIR})")
    parser.add_argument("--url", default=service_url(),
                        help="prediction service URL (default: $PREDICT_URL, else %(default)s)")
    parser.add_argument("--timeout", type=seconds, default=None,
                        help=f"seconds to wait for each answer (default: $PREDICT_TIMEOUT, else {PREDICT_TIMEOUT:g})")
    return parser.parse_args(argv)


def expand(paths: list[Path]) -> list[Path]:
    """Folders become the photos inside them; files stay as given (a bad one gets its own error)."""
    return [image for path in paths for image in (image_files(path) if path.is_dir() else [path])]


def describe(answer: dict) -> str:
    """`Car (97.1%)`; for a photo out of distribution, what the page says, with the closer class."""
    label = f"{answer['label']} ({answer['confidence']:.1%})"
    if answer.get("in_distribution") is False:  # None: the service's check is off
        distance = f"distance {answer['ood_score']:.2f}"
        return f"neither a car nor a bike? (out of distribution: {distance}; closer class {label})"
    return label


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.images:
        images = expand(args.images)
        if not images:
            print(f"error: no photos in {', '.join(map(str, args.images))}", file=sys.stderr)
            return 1
    else:
        images = image_files(config.DATA_DIR)[:1] if config.DATA_DIR.is_dir() else []
        if not images:
            print(f"error: no image given and none found under {config.DATA_DIR}/; pass a photo "
                  f"(python test.py PHOTO.jpg) or put the dataset there ({config.DATA_DIR}/Car/, .../Bike/)",
                  file=sys.stderr)
            return 1

    try:
        client = PredictionClient(args.url, timeout=args.timeout)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = False
    for path in images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"{path}: error: cannot read it ({exc.strerror or exc})", file=sys.stderr)
            failed = True
            continue
        try:
            answer = client.predict(data, filename=path.name)
        except ServiceError as exc:
            if exc.unavailable:  # the other photos would fail the same way
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"{path}: error: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{path}: {describe(answer)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `python test.py FOLDER | head`: the reader is gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
