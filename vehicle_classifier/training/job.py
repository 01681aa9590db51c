"""A training job: what a run reads, where it writes and how, in one object that train.py builds
from its flags (and tests, benchmarks and scripts from theirs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..data import ImageFolder, read_image_folder
from ..distributed import SINGLE, Group
from ..registry import BackboneSpec, get_spec


@dataclass
class Job:
    data_dir: Path  # the image folder, one sub-folder per class
    output_dir: Path = config.OUTPUT_DIR  # where the artifact, metrics.json, split.json and plots are published
    cfg: config.TrainConfig = field(default_factory=config.TrainConfig)
    weights: Path | None = None  # the backbone's weights file; None: the Hugging Face cache, then the hub
    cache_dir: Path = config.FEATURE_CACHE_DIR  # the feature cache
    device: str = "auto"  # auto (CUDA when available), cpu or cuda[:N]
    spec: BackboneSpec | None = None  # the backbone; None: registry.get_spec(cfg.backbone)
    # data_dir read, every file hashed, by train.py's up-to-date check (fingerprint.py), so that
    # a run reads each photo's content once. None: read by the run.
    photos: ImageFolder | None = None
    fingerprint: str | None = None  # what the up-to-date check compares (fingerprint.py), kept in the artifact
    group: Group = SINGLE  # under torchrun: this process's rank and its peers

    def __post_init__(self):
        self.data_dir, self.output_dir, self.cache_dir = map(Path, (self.data_dir, self.output_dir, self.cache_dir))
        self.spec = self.spec or get_spec(self.cfg.backbone)

    def read_photos(self) -> ImageFolder:
        return self.photos or read_image_folder(self.data_dir)
