"""Train the Car/Bike head on frozen DINO features and write the model artifact (a shim: the
command is vehicle_classifier/training/cli.py, also installed as `vehicle-train`).

    python train.py --data-dir data/Car-Bike-Dataset --output-dir models/
    torchrun --nproc-per-node=gpu train.py ...   # features extracted on every GPU at once
"""

import sys

from vehicle_classifier.training.cli import HELP, build_parser, main  # noqa: F401 (the command's own)

if __name__ == "__main__":
    sys.exit(main())
