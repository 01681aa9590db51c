"""A training run, top to bottom:

    scan -> features -> split -> head -> calibrate -> "neither" -> publish

`run_training(job)` goes from the job's image folder (job.py) to the model artifact, metrics.json,
split.json and plots in its output folder, published as one set (all of them or none; see
fileio.publish), holding that folder's lock throughout. Under torchrun every rank extracts its
share of the features, and rank 0 alone goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import UserError, config
from ..artifact import OOD_REFERENCES, read_metadata
from ..backbone import has_cls_attention, load_backbone, preprocessing_for
from ..data import DataError, ImageFolder, Sample, file_digest, stratified_split
from ..devices import torch_threads
from ..fileio import clean_temporaries, exclusive, recover
from ..export import exported_graph
from ..model.torch_forward import forward_for
from ..runtime import resolve_precision, runtime_for
from .calibration import Calibration, calibrate
from .exclude import apply_exclusions
from .features import FeatureCache, cache_key, extract_features, part_cache
from .graphs import float_graph, int8_features, int8_graph
from .head_training import TrainedHead, predict_proba, train_head
from .job import Job
from .metrics import classification_metrics
from .neither import Neither, fit_neither, neither_paths
from .outputs import publish_outputs

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, in train.py): its message says what was kept and what was not."""


def run_training(job: Job) -> dict | None:
    """Run the job. Returns its metrics (metrics.json's, without the per-epoch history); None on
    a torchrun rank other than 0. Raises a UserError with a message fit for one line (a second
    run on the same output folder stops at once, naming this one), or RunInterrupted."""
    if not job.group.is_main:
        extract(job)
        return None
    with exclusive(job.output_dir, "output folder", wait=False, setting="output_dir"):
        if recover(job.output_dir):
            log.warning("%s: a killed run's half-published outputs were rolled back to the previous set", job.output_dir)
        for stale in clean_temporaries(job.output_dir):
            log.info("removed %s, left by a killed run", stale)
        before = _published_version(job.output_dir)
        try:
            return _run(job)
        except KeyboardInterrupt:
            raise RunInterrupted(_interrupted_outcome(job.output_dir, before)) from None


def _run(job: Job) -> dict:
    started = time.perf_counter()
    ex = extract(job)  # scan -> features
    data = readable(ex, job.cfg)  # each readable photo once, but those the audit flags
    split = stratified_split(data.labels.tolist(), job.cfg.val_fraction, job.cfg.test_fraction, job.cfg.seed)
    fitted = fit({name: (data.features[idx], data.labels[idx]) for name, idx in split.items()},  # head ->
                 ex.photos.class_names, ex.neither, job.cfg)  # calibrate -> "neither"
    summary = {
        "images_found": len(ex.photos.samples), "images_skipped": len(ex.failures),
        "duplicates_dropped": data.duplicates, "class_counts": data.class_counts,
        "best_epoch": fitted.trained.best_epoch, "epochs_run": len(fitted.trained.history),
        "precision": ex.precision, "runtime": ex.runtime, "device": str(ex.device),
        "extract_seconds": round(ex.seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        **({"excluded": data.excluded} if data.excluded else {}),
    }
    return publish(job, ex, data, split, fitted, summary)  # publish


# --- scan -> features -----------------------------------------------------------------------
@dataclass
class Extraction:
    """The photos found, the backbone and the features of the readable ones."""

    photos: ImageFolder
    backbone: nn.Module
    forward: object  # the run's one forward (torch_forward.forward_for); on CPU its graph is published
    graphs: Path  # where the run's graphs are kept for the next run (graphs.py)
    weights_digest: str
    preprocessing: dict
    device: torch.device
    precision: str
    runtime: str
    features: dict[str, torch.Tensor]  # by file digest
    failures: dict[Path, str]  # the dataset's unreadable files, and why
    neither: list[torch.Tensor]  # the features of the readable images of neither class
    seconds: float


def extract(job: Job) -> Extraction:
    """Scan, load the backbone, extract the dataset's and the 'neither' images' features in one
    pass (under torchrun, this rank's share, into its part of the cache); unreadable files are
    skipped with a warning."""
    photos = job.read_photos()
    backbone, weights_digest = load_backbone(job.spec, job.weights)
    preprocessing = preprocessing_for(backbone)
    device = job.group.device(job.device)
    precision, runtime = resolve_precision(job.cfg.precision, device), runtime_for(device)
    if precision == "int8":  # the head learns from the float graph's features; the gate measures int8's
        precision = "fp32"
    key = cache_key(job.spec.architecture, job.spec.model_kwargs, weights_digest, preprocessing, precision, runtime)
    graphs = Path(job.cache_dir) / key  # the cache key's folder keeps the graphs too (graphs.py)
    graph = float_graph(graphs, lambda: exported_graph(backbone, preprocessing)) if runtime == "openvino" else None
    forward = forward_for(backbone, preprocessing, device, precision, graph)
    others = neither_paths(job.cfg.neither_dir)
    other_digests = [file_digest(p) for p in others]
    # The bar counts every file not yet cached: the photos and the 'neither' images (data/neither:
    # 400 + 24 = 424 on the sample), while the summary counts the photos only.
    desc = "extracting features (photos + 'neither' images)" if others else "extracting features"
    started = time.perf_counter()
    cache = FeatureCache(job.cache_dir, key) if job.group.is_main else part_cache(job.cache_dir, key, job.group)
    with cache:
        features, failures = extract_features(
            forward, [s.path for s in photos.samples] + others, photos.digests + other_digests, preprocessing,
            cache, batch_size=job.cfg.extract_batch_size, group=job.group, desc=desc,
        )
    if job.group.is_main:  # it has every rank's failures
        for path, reason in failures.items():
            log.warning("skipped %s: %s", path, reason)
    return Extraction(photos, backbone, forward, graphs, weights_digest, preprocessing, device, precision, runtime, features,
                      {p: r for p, r in failures.items() if p not in set(others)},
                      [features[d] for d in other_digests if d in features], time.perf_counter() - started)


@dataclass
class Readable:
    """What the head learns from: the readable photos, each content once, but those the audit flags."""

    samples: list[Sample]
    digests: list[str]  # each sample's file digest (the feature caches' key)
    features: torch.Tensor
    labels: torch.Tensor
    duplicates: int  # identical files (by content) beyond the first, left out
    excluded: dict | None  # what cfg.exclude's audit left out (exclude.py); None without one
    class_counts: dict[str, int]


def readable(ex: Extraction, cfg: config.TrainConfig) -> Readable:
    """The readable photos, each content once, but those cfg.exclude's audit flags."""
    kept, duplicates = unique_readable(ex.photos.samples, ex.photos.digests, ex.features)
    kept, excluded = apply_exclusions(kept, ex.photos.root, cfg)
    labels = [s.label for s, _ in kept]
    counts = {name: labels.count(i) for i, name in enumerate(ex.photos.class_names)}
    if any(n < 2 for n in counts.values()):
        raise DataError(f"every class needs at least two readable images; found {counts}")
    return Readable([s for s, _ in kept], [d for _, d in kept], torch.stack([ex.features[d] for _, d in kept]),
                    torch.tensor(labels), duplicates, excluded, counts)


def unique_readable(samples: list[Sample], digests: list[str], features: dict) -> tuple[list[tuple[Sample, str]], int]:
    """The readable samples (those with features) with their digests, identical files (same
    content) counted once so that a duplicate can never sit on both sides of the train/test
    split; and how many duplicates were dropped. The split is made over exactly this list."""
    kept, seen, duplicates = [], set(), 0
    for sample, digest in zip(samples, digests):
        if digest not in features:
            continue
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        kept.append((sample, digest))
    return kept, duplicates


# --- head -> calibrate -> "neither" ---------------------------------------------------------
@dataclass
class Fitted:
    """What the run learned from the features."""

    trained: TrainedHead
    calibration: Calibration
    neither: Neither | None
    metrics: dict[str, dict]  # each split's classification metrics, on calibrated probabilities


def fit(part: dict, class_names: list[str], neither: list[torch.Tensor], cfg: config.TrainConfig) -> Fitted:
    """The head trained on the split's features (`part`: each split's features and labels), its
    temperature, the 'neither' threshold, and each split's metrics."""
    # The head's steps are tiny (a few hundred rows by 384): in one thread, no OpenMP team to
    # wake per operation (4 s instead of 50-70 s for 40 epochs on a busy 2-core machine).
    with torch_threads(1):
        trained = train_head(*part["train"], *part["val"], len(class_names), cfg)
        calibration = calibrate(trained.head, part, trained.best_epoch, cfg)
        fitted_neither = fit_neither(part, neither, cfg)
        metrics = {
            name: classification_metrics(yy.numpy(), predict_proba(trained.head, xx, calibration.temperature).numpy(),
                                         class_names)
            for name, (xx, yy) in part.items()
        }
    return Fitted(trained, calibration, fitted_neither, metrics)


# --- publish --------------------------------------------------------------------------------
def publish(job: Job, ex: Extraction, data: Readable, split: dict, fitted: Fitted, summary: dict) -> dict:
    """Publish the artifact, metrics.json, split.json and plots as one set; returns the metrics."""
    reports = {"calibration": fitted.calibration.report, "ood": fitted.neither and fitted.neither.report}
    metrics_doc = {**fitted.metrics, **reports, "summary": summary}
    split_doc = {
        "data_dir": str(job.data_dir), "seed": job.cfg.seed, "class_names": ex.photos.class_names,
        **{name: [str(data.samples[i].path.relative_to(job.data_dir)) for i in idx] for name, idx in split.items()},
    }
    tensors = {OOD_REFERENCES: torch.from_numpy(fitted.neither.references)} if fitted.neither else {}
    files = {config.RELIABILITY_PLOT: fitted.calibration.diagram} if fitted.calibration.diagram else {}
    graphs, metrics_doc["int8"] = int8_gate(ex, data, split, fitted)
    metadata = {**artifact_metadata(job, ex, fitted, summary), "int8": metrics_doc["int8"]}
    publish_outputs(job.output_dir, ex.backbone, fitted.trained.head, metadata,
                    split_doc, {**metrics_doc, "history": fitted.trained.history},
                    extra_tensors=tensors, extra_files=files, graphs=graphs)
    return metrics_doc


def int8_gate(ex: Extraction, data: Readable, split: dict, fitted: Fitted) -> tuple[tuple | None, dict | None]:
    """On the CPU (where the int8 graph runs): (float graph, int8 graph) to publish (the float
    one is the graph the features came from) and the fidelity gate's report on the validation
    photos; (None, None) elsewhere or without them."""
    if ex.runtime != "openvino" or not len(split["val"]):
        return None, None
    from .int8 import fidelity, quantized  # nncf: only here

    train = [data.samples[i].path for i in split["train"]]
    graphs = ex.forward.graph, int8_graph(ex.graphs, lambda: quantized(ex.forward.graph, ex.preprocessing, train,
                                                                      has_cls_attention(ex.backbone)))
    val = split["val"]
    fast = int8_features_of(ex, graphs[1], [data.samples[i].path for i in val], [data.digests[i] for i in val])
    kept = [i for i in val if data.digests[i] in fast]  # all of them, unless a file changed meanwhile
    if not kept:
        return graphs, None
    report = fidelity(data.features[kept].numpy(), torch.stack([fast[data.digests[i]] for i in kept]).numpy(),
                      ex.precision, fitted.trained.head, fitted.calibration.temperature,
                      [data.samples[i].label for i in kept])
    return graphs, report


def int8_features_of(ex: Extraction, graph, paths: list[Path], digests: list[str]) -> dict[str, torch.Tensor]:
    """The photos' features through the int8 `graph` (by digest), as the run extracts (decode
    workers, batches), kept beside the graph (graphs.int8_features): --force reruns none of them."""
    forward = forward_for(ex.backbone, ex.preprocessing, ex.device, "int8", graph)
    with int8_features(ex.graphs) as cache:
        features, _ = extract_features(forward, paths, digests, ex.preprocessing, cache,
                                       desc="int8 fidelity gate (validation photos)")
    return features


def artifact_metadata(job: Job, ex: Extraction, fitted: Fitted, summary: dict) -> dict:
    """What the artifact says about itself: classes, backbone, preprocessing, how it was trained,
    its headline metrics, temperature and 'neither' threshold."""
    ood = fitted.neither and fitted.neither.report
    return {
        "class_names": ex.photos.class_names,
        "backbone": {"name": job.spec.name, "architecture": job.spec.architecture,
                     "model_kwargs": job.spec.model_kwargs, "weights_digest": ex.weights_digest,
                     "weights_source": str(job.weights) if job.weights else job.spec.hub_id},
        "preprocessing": ex.preprocessing,
        "training": {**asdict(job.cfg), "data_dir": str(job.data_dir), **summary, "fingerprint": job.fingerprint},
        "metrics": {name: {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"]} for name, m in fitted.metrics.items()},
        "calibration": {"temperature": fitted.calibration.temperature},
        "ood": ood and {key: ood[key] for key in ("method", "k", "references", "acceptance_target", "threshold")},
    }


# --- an interrupted run ---------------------------------------------------------------------
def _published_version(output_dir: Path) -> str | None:
    try:
        return read_metadata(output_dir / config.ARTIFACT_FILE)["model_version"]
    except UserError:
        return None


def _interrupted_outcome(output_dir: Path, before: str | None) -> str:
    """What an interrupted run leaves, read from the disk: the publish happened or it did not."""
    if _published_version(output_dir) != before:
        return f"the new model was published just before: {output_dir} holds this run's complete outputs"
    kept = "the previous model and its outputs" if before else "no model (it had none before)"
    return (f"{output_dir} is unchanged and holds {kept}; the features extracted so far are kept in the "
            f"cache, so a rerun continues where this one stopped")
