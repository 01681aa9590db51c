"""Calibration: the temperature T that turns the head's logits into honest probabilities
(softmax(logits / T)), fitted where TrainConfig.calibration says, and how well calibrated the
answers are before and after it (expected calibration error, log-loss, the reliability diagram)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import config
from ..data import stratified_folds
from ..head import MLPHead
from .head_training import new_head, train_epoch
from .metrics import calibration_error, reliability_diagram_png


@dataclass
class Calibration:
    temperature: float
    report: dict  # metrics.json's "calibration": the method, T, and each held-out part's figures
    diagram: bytes | None  # the reliability diagram (PNG); None without a test split


def calibrate(head: MLPHead, part: dict, best_epoch: int, cfg: config.TrainConfig) -> Calibration:
    """The temperature, fitted where cfg.calibration says (fitting_logits); then expected
    calibration error and log-loss before and after it on the logits it was fitted on, val and
    test; and the reliability diagram of those logits and the test split. `part`: each split's
    (features, labels)."""
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
    return Calibration(report["temperature"], report, diagram)


def fitting_logits(held_out: dict, part: dict, best_epoch: int, cfg: config.TrainConfig,
                   num_classes: int) -> tuple[str | None, dict]:
    """The name of the logits the temperature is fitted on, in `held_out` (out-of-fold ones are
    added to it), and the report's method. "val": the kept head's validation logits, free but few
    (60 on the sample, which also chose its epoch). "out-of-fold": every train+val photo scored by
    a head that never saw it (out_of_fold_logits; 340 on the sample), which lowered held-out
    log-loss by 18% where the validation fit did not (docs/training.md, "Calibration"), for the
    training of config.CALIBRATION_FOLDS more heads."""
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
        head, optimizer, generator = new_head(x.shape[1], num_classes, cfg)
        for _ in range(epochs):
            train_epoch(head, optimizer, x[~held_out], y[~held_out], cfg.batch_size, generator)
        with torch.no_grad():
            logits[held_out] = head.eval()(x[held_out])
    return logits
