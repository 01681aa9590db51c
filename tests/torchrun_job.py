"""Run by tests/test_distributed.py under torchrun: train.py's training with the tiny test
backbone (each rank extracting its shard of the features, rank 0 training), then batch
prediction with the model it wrote (each rank classifying its shard, rank 0 merging): one
launch for both, since starting the processes is most of the cost.

    torchrun ... tests/torchrun_job.py DATA_DIR WEIGHTS OUTPUT_DIR CACHE_DIR PREDICTIONS
"""

import sys
from pathlib import Path

from conftest import TINY_SPEC  # beside this script, the first entry of sys.path
from vehicle_classifier import config, registry
from vehicle_classifier.offline import batch
from vehicle_classifier.distributed import process_group
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import run_training

registry.BACKBONES[TINY_SPEC.name] = TINY_SPEC
data_dir, weights, output_dir, cache_dir, predictions = map(Path, sys.argv[1:6])
with process_group() as group:
    # No 'neither' images: the test counts the dataset's photos in the cache and in each rank's progress bar.
    cfg = config.TrainConfig(backbone=TINY_SPEC.name, max_epochs=5, neither_dir="")
    metrics = run_training(Job(data_dir, output_dir, cfg, weights, cache_dir, device="cpu", spec=TINY_SPEC, group=group))
    print(f"rank {group.rank} of {group.world_size}: {'trained' if metrics else 'extracted its shard'}", flush=True)
    group.gather(None)  # the model is written before any rank reads it
    code = batch.main([str(data_dir), "--model-dir", str(output_dir), "--output", str(predictions), "--device", "cpu"])
sys.exit(code)
