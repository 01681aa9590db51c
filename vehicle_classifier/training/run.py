"""Training: the head's loop (AdamW, early stopping on validation loss, best epoch kept) and the
whole run from an image folder to an artifact, metrics and plots."""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import UserError, config
from ..artifact import OOD_REFERENCES, encode_artifact, read_metadata
from ..backbone import BackboneSpec, get_spec, load_backbone, preprocessing_for
from ..distributed import SINGLE, Group
from ..data import DataError, Sample, file_digest, scan_image_folder, stratified_folds, stratified_split
from .exclude import apply_exclusions
from .features import FeatureCache, cache_key, extract_features, part_cache
from ..export import export_files
from ..fileio import clean_temporaries, exclusive, json_bytes, publish, recover
from ..head import MLPHead
from ..devices import torch_threads
from ..runtime import resolve_precision, runtime_for
from .metrics import (
    calibration_error,
    classification_metrics,
    confusion_matrix_png,
    learning_curves_png,
    reliability_diagram_png,
)
from ..ood import choose_threshold, flagged_rate, ood_scores, reference_features

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_proba(head: MLPHead, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    head.eval()
    return (head(features) / temperature).softmax(dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al., 2017): the T that minimises the negative log-likelihood
    of softmax(logits / T) on these held-out labels, under a log-normal prior centred on T = 1
    (sigma 1). Without the prior, held-out logits the head gets all right drive T towards 0,
    which would answer 0 % or 100 % for every photo, wrong ones included."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels, reduction="sum") + log_t.pow(2).sum() / 2
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """Expected calibration error and mean log-loss at T = 1 and at `temperature`, with the
    calibration_error tables (for the diagram) under "tables"."""
    figures, tables = {}, []
    for when, t in (("before", 1.0), ("after", temperature)):
        table = calibration_error(labels.numpy(), (logits / t).softmax(dim=1).numpy(), config.CALIBRATION_BINS)
        figures[f"ece_{when}"] = table["ece"]
        figures[f"nll_{when}"] = float(F.cross_entropy(logits / t, labels))
        tables.append(table)
    return {**figures, "tables": tables}


def calibrate(head: MLPHead, part: dict, best_epoch: int, cfg: config.TrainConfig) -> tuple[float, dict, bytes | None]:
    """The temperature, fitted where cfg.calibration says (fitting_logits); then expected
    calibration error and log-loss before and after it on the logits it was fitted on, val and
    test; and the reliability diagram of those logits and the test split (PNG; None without a
    test split)."""
    with torch.no_grad():
        logits = {name: head.eval()(xx) for name, (xx, _) in part.items()}
    held_out = {name: (logits[name], part[name][1]) for name in ("val", "test") if len(part[name][1])}
    fitted, report = fitting_logits(held_out, part, best_epoch, cfg, head.config["num_classes"])
    report.update(bins=config.CALIBRATION_BINS, temperature=fit_temperature(*held_out[fitted]) if fitted else 1.0)
    tables = {}
    for name, (ll, yy) in held_out.items():
        errors = int((ll.argmax(dim=1) != yy).sum())
        report[name] = {"count": len(yy), "errors": errors, **calibration_figures(ll, yy, report["temperature"])}
        tables[name] = report[name].pop("tables")
    titles = {fitted: f"{'validation' if fitted == 'val' else 'train+val out of fold'} (T fitted)",
              "test": "test split"}
    panels = {f"{title}: {report[name]['count']} photos": tables[name] for name, title in titles.items() if name in tables}
    diagram = reliability_diagram_png(panels, config.CALIBRATION_BINS, report["temperature"]) if "test" in tables else None
    return report["temperature"], report, diagram


def fitting_logits(held_out: dict, part: dict, best_epoch: int, cfg: config.TrainConfig,
                   num_classes: int) -> tuple[str | None, dict]:
    """The name of the logits the temperature is fitted on, in `held_out` (out-of-fold ones are
    added to it), and the report's method. "val": the kept head's validation logits, free but few
    (60 on the sample, which also chose its epoch). "out-of-fold": every train+val photo scored by
    a head that never saw it (out_of_fold_logits; 340 on the sample), which lowered held-out
    log-loss by 18% where the validation fit did not (docs/training.md, "Calibration"), for the training of
    config.CALIBRATION_FOLDS more heads."""
    if cfg.calibration == "out-of-fold":
        x, y = (torch.cat([part["train"][i], part["val"][i]]) for i in (0, 1))
        folds = min(config.CALIBRATION_FOLDS, len(y))
        if folds >= 2:
            held_out["out_of_fold"] = (out_of_fold_logits(x, y, num_classes, best_epoch, cfg), y)
            return "out_of_fold", {"method": f"temperature scaling on {folds}-fold out-of-fold logits of train+val",
                                   "folds": folds}
    elif "val" in held_out:
        return "val", {"method": "temperature scaling on the validation logits"}
    return None, {"method": "none: too few photos to fit a temperature on"}


def fit_ood(part: dict, neither: list[torch.Tensor], acceptance: float,
            seed: int) -> tuple[np.ndarray | None, dict | None]:
    """The reference features the artifact keeps and the 'neither' threshold, at `acceptance`
    of the validation photos; with the share of test photos accepted and of the 'neither'
    images flagged. None without a validation split to choose the threshold on."""
    if not len(part["val"][1]):
        log.warning("no validation split: answers will not say whether a photo is like the training photos")
        return None, None
    references = reference_features(part["train"][0], seed)
    scores = {name: ood_scores(x, references) for name, (x, _) in part.items()}
    threshold = choose_threshold(scores["val"], acceptance)
    accepted = {name: 1 - flagged_rate(scores[name], threshold) for name in ("val", "test") if len(scores[name])}
    neither_flagged = flagged_rate(ood_scores(torch.stack(neither), references), threshold) if neither else None
    return references, {
        "method": "knn-cosine", "k": config.OOD_NEIGHBOURS, "references": len(references),
        "acceptance_target": acceptance, "threshold": threshold, "accepted": accepted,
        "neither": {"count": len(neither), "flagged": neither_flagged},
    }


def neither_paths(folder: Path | str) -> list[Path]:
    """The images that are neither class (any file under `folder`; none when it is absent, or
    '' to skip them)."""
    if not str(folder) or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))


def _new_head(in_dim: int, num_classes: int, cfg: config.TrainConfig):
    """A freshly seeded head, its optimizer and the generator of its batch order."""
    seed_everything(cfg.seed)
    head = MLPHead(in_dim, num_classes, cfg.hidden_dim, cfg.dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return head, optimizer, torch.Generator().manual_seed(cfg.seed)


def _train_epoch(head: MLPHead, optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 generator: torch.Generator) -> None:
    head.train()
    for batch in torch.randperm(len(y), generator=generator).split(batch_size):
        loss = F.cross_entropy(head(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_head(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    num_classes: int, cfg: config.TrainConfig, progress: bool = True,
) -> tuple[MLPHead, list[dict], int]:
    """Train on features; returns the head of the best validation-loss epoch, the per-epoch
    history and that epoch's number. The same seed gives the same head."""
    head, optimizer, generator = _new_head(train_x.shape[1], num_classes, cfg)
    # With no validation split, early stopping watches the training loss.
    watch_x, watch_y = (val_x, val_y) if len(val_y) else (train_x, train_y)
    history, best_loss, best_epoch, best_state = [], float("inf"), 0, None
    epochs = tqdm(range(1, cfg.max_epochs + 1), desc="training head", unit="epoch", disable=not progress)
    for epoch in epochs:
        _train_epoch(head, optimizer, train_x, train_y, cfg.batch_size, generator)
        record = {"epoch": epoch}
        for split, x, y in (("train", train_x, train_y), ("val", watch_x, watch_y)):
            with torch.no_grad():
                head.eval()
                logits = head(x)
                record[f"{split}_loss"] = float(F.cross_entropy(logits, y))
                record[f"{split}_accuracy"] = float((logits.argmax(1) == y).float().mean())
        history.append(record)
        if record["val_loss"] < best_loss - 1e-6:
            best_loss, best_epoch, best_state = record["val_loss"], epoch, copy.deepcopy(head.state_dict())
        epochs.set_postfix(val_loss=f"{record['val_loss']:.4f}", val_acc=f"{record['val_accuracy']:.3f}", refresh=False)
        if epoch - best_epoch >= cfg.patience:
            break
    head.load_state_dict(best_state)
    return head.eval(), history, best_epoch


def out_of_fold_logits(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int,
                       cfg: config.TrainConfig) -> torch.Tensor:
    """Every sample's logits from a head that never saw it: the samples dealt into
    config.CALIBRATION_FOLDS stratified folds, one head per fold trained as the kept head was
    (same settings and seed, for its `epochs`, the best epoch) on the other folds and applied to
    its own. No early stopping: nothing held out steers the heads."""
    folds = torch.tensor(stratified_folds(y.tolist(), config.CALIBRATION_FOLDS, cfg.seed))
    logits = torch.empty(len(y), num_classes)
    for fold in folds.unique().tolist():
        held_out = folds == fold
        head, optimizer, generator = _new_head(x.shape[1], num_classes, cfg)
        for _ in range(epochs):
            _train_epoch(head, optimizer, x[~held_out], y[~held_out], cfg.batch_size, generator)
        with torch.no_grad():
            logits[held_out] = head.eval()(x[held_out])
    return logits


def pick_device(requested: str = "auto") -> torch.device:
    """`auto`: CUDA when available, else the CPU (the notebook's choice too)."""
    return SINGLE.device(requested)


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


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, in train.py): its message says what was kept and what was not."""


def run_training(
    data_dir: Path,
    output_dir: Path,
    cfg: config.TrainConfig,
    weights: Path | None = None,
    cache_dir: Path = config.FEATURE_CACHE_DIR,
    device: str = "auto",
    spec: BackboneSpec | None = None,
    fingerprint: str | None = None,
    group: Group = SINGLE,
) -> dict | None:
    """Image folder -> cached features -> trained head -> artifact, metrics.json, split.json and
    plots in `output_dir`, published as one set (all of them or none; see fileio.publish). Holds
    the output folder's lock throughout: a second run on it stops at once, naming this one.
    Returns the metrics. Raises a UserError with a message fit for one line, or RunInterrupted.
    Under torchrun every rank extracts its share of the features and rank 0 alone trains and
    writes; the other ranks return None."""
    if not 0 < cfg.ood_acceptance <= 1:  # before any work
        raise DataError(f"--ood-acceptance must be in (0, 1], not {cfg.ood_acceptance}")
    spec = spec or get_spec(cfg.backbone)
    if not group.is_main:
        _extract(Path(data_dir), cfg, weights, cache_dir, device, spec, group)
        return None
    output_dir = Path(output_dir)
    with exclusive(output_dir, "--output-dir", wait=False):
        if recover(output_dir):
            log.warning("%s: a killed run's half-published outputs were rolled back to the previous set", output_dir)
        for stale in clean_temporaries(output_dir):
            log.info("removed %s, left by a killed run", stale)
        before = _published_version(output_dir)
        try:
            return _run(Path(data_dir), output_dir, cfg, weights, cache_dir, device, spec, fingerprint, group)
        except KeyboardInterrupt:
            raise RunInterrupted(_interrupted_outcome(output_dir, before)) from None


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


@dataclass
class Extraction:
    """The images found, the backbone and the features of the readable ones."""

    class_names: list[str]
    samples: list[Sample]
    digests: list[str]
    others: list[Path]  # the 'neither' images
    other_digests: list[str]
    backbone: nn.Module
    weights_digest: str
    preprocessing: dict
    device: torch.device
    precision: str
    runtime: str
    features: dict[str, torch.Tensor]
    failures: dict[Path, str]
    seconds: float


def _extract(data_dir: Path, cfg: config.TrainConfig, weights: Path | None, cache_dir: Path, device: str,
             spec: BackboneSpec, group: Group) -> Extraction:
    """Scan, load the backbone, extract (this rank's share under torchrun, into its part cache)."""
    class_names, samples = scan_image_folder(data_dir)
    backbone, weights_digest = load_backbone(spec, weights)
    preprocessing = preprocessing_for(backbone)
    torch_device = group.device(device)
    precision = resolve_precision(cfg.precision, torch_device)
    runtime = runtime_for(torch_device)
    key = cache_key(spec.architecture, spec.model_kwargs, weights_digest, preprocessing, precision, runtime)
    digests = [file_digest(s.path) for s in samples]
    others = neither_paths(cfg.neither_dir)
    other_digests = [file_digest(p) for p in others]
    started = time.perf_counter()
    with FeatureCache(cache_dir, key) if group.is_main else part_cache(cache_dir, key, group) as cache:
        features, failures = extract_features(  # the dataset and the 'neither' images, in one pass
            backbone, [s.path for s in samples] + others, digests + other_digests, preprocessing, cache,
            torch_device, precision, batch_size=cfg.extract_batch_size, group=group,
        )
    return Extraction(class_names, samples, digests, others, other_digests, backbone, weights_digest, preprocessing,
                      torch_device, precision, runtime, features, failures, time.perf_counter() - started)


def _run(data_dir: Path, output_dir: Path, cfg: config.TrainConfig, weights: Path | None, cache_dir: Path,
         device: str, spec: BackboneSpec, fingerprint: str | None, group: Group) -> dict:
    started = time.perf_counter()
    ex = _extract(data_dir, cfg, weights, cache_dir, device, spec, group)
    class_names, samples, digests, features, failures = ex.class_names, ex.samples, ex.digests, ex.features, ex.failures
    for path, reason in failures.items():
        log.warning("skipped %s: %s", path, reason)
    failures = {p: r for p, r in failures.items() if p not in set(ex.others)}  # the summary counts the dataset's
    neither = [features[d] for d in ex.other_digests if d in features]

    kept, duplicates = unique_readable(samples, digests, features)
    kept, excluded = apply_exclusions(kept, data_dir, cfg)
    labels = [s.label for s, _ in kept]
    counts = {name: labels.count(i) for i, name in enumerate(class_names)}
    if any(n < 2 for n in counts.values()):
        raise DataError(f"every class needs at least two readable images; found {counts}")

    split = stratified_split(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    head, history, best_epoch, metrics, trust = _fit(torch.stack([features[d] for _, d in kept]),
                                                     torch.tensor(labels), split, class_names, cfg, neither)
    summary = {
        "images_found": len(samples), "images_skipped": len(failures), "duplicates_dropped": duplicates,
        "class_counts": counts, "best_epoch": best_epoch, "epochs_run": len(history), "precision": ex.precision,
        "runtime": ex.runtime, "device": str(ex.device), "extract_seconds": round(ex.seconds, 2),
        "seconds": round(time.perf_counter() - started, 2), **({"excluded": excluded} if excluded else {}),
    }
    split_doc = {
        "data_dir": str(data_dir), "seed": cfg.seed, "class_names": class_names,
        **{name: [str(kept[i][0].path.relative_to(data_dir)) for i in idx] for name, idx in split.items()},
    }
    artifact_metadata = {
        "class_names": class_names,
        "backbone": {"name": spec.name, "architecture": spec.architecture, "model_kwargs": spec.model_kwargs,
                     "weights_digest": ex.weights_digest, "weights_source": str(weights) if weights else spec.hub_id},
        "preprocessing": ex.preprocessing,
        "training": {**asdict(cfg), "data_dir": str(data_dir), **summary, "fingerprint": fingerprint},
        "metrics": {name: {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"]} for name, m in metrics.items()},
        "calibration": {"temperature": trust["calibration"]["temperature"]},
        "ood": trust["ood"] and {key: trust["ood"][key] for key in ("method", "k", "references", "acceptance_target",
                                                                   "threshold")},
    }
    reports = {"calibration": trust["calibration"], "ood": trust["ood"]}
    publish_outputs(output_dir, ex.backbone, head, artifact_metadata, split_doc,
                    {**metrics, **reports, "summary": summary, "history": history},
                    extra_tensors=trust["tensors"], extra_files=trust["files"])
    return {**metrics, **reports, "summary": summary}


def _fit(x: torch.Tensor, y: torch.Tensor, split: dict, class_names: list[str], cfg: config.TrainConfig,
         neither: list[torch.Tensor]):
    """The head trained on the split's features, its history and best epoch, each part's metrics
    (calibrated probabilities), and what makes its answers trustworthy: the calibration and
    'neither' reports, the tensors the artifact keeps for them and the reliability diagram."""
    part = {name: (x[idx], y[idx]) for name, idx in split.items()}
    # The head's steps are tiny (a few hundred rows by 384): in one thread, no OpenMP team to
    # wake per operation (4 s instead of 50-70 s for 40 epochs on a busy 2-core machine).
    with torch_threads(1):
        head, history, best_epoch = train_head(*part["train"], *part["val"], len(class_names), cfg)
        temperature, calibration, diagram = calibrate(head, part, best_epoch, cfg)
        references, ood = fit_ood(part, neither, cfg.ood_acceptance, cfg.seed)
        metrics = {
            name: classification_metrics(yy.numpy(), predict_proba(head, xx, temperature).numpy(), class_names)
            for name, (xx, yy) in part.items()
        }
    if ood:
        ood["neither"]["dir"] = str(cfg.neither_dir)
    trust = {"calibration": calibration, "ood": ood,
             "tensors": {OOD_REFERENCES: torch.from_numpy(references)} if references is not None else {},
             "files": {config.RELIABILITY_PLOT: diagram} if diagram else {}}
    return head, history, best_epoch, metrics, trust


def publish_outputs(output_dir: Path, backbone: nn.Module, head: MLPHead, artifact_metadata: dict, split_doc: dict,
                    metrics_doc: dict, extra_tensors: dict | None = None, extra_files: dict | None = None) -> str:
    """Render every output in memory, then publish them as one set; metrics.json and split.json
    carry the artifact's model_version, so a reader can tell they belong to it. Returns it."""
    artifact, stored = encode_artifact(backbone, head, artifact_metadata, extra_tensors)
    version = stored["model_version"]
    files = {
        config.ARTIFACT_FILE: artifact,
        **export_files(backbone, stored),  # what the CPU service runs, without torch
        config.METRICS_FILE: json_bytes({"model_version": version, **metrics_doc}),
        config.SPLIT_FILE: json_bytes({"model_version": version, **split_doc}),
        config.HISTORY_PLOT: learning_curves_png(metrics_doc["history"], metrics_doc["summary"]["best_epoch"]),
    }
    if metrics_doc["test"]["count"]:
        files[config.CONFUSION_PLOT] = confusion_matrix_png(
            metrics_doc["test"]["confusion_matrix"], artifact_metadata["class_names"], "test split")
    files.update(extra_files or {})
    publish(output_dir, files, replaces=config.OUTPUT_FILES)
    return version
