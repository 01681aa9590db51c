"""The head's training loop: AdamW on the features, early stopping on the validation loss, the best
epoch's head kept. The same seed gives the same head."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import config
from ..head import MLPHead


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict_proba(head: MLPHead, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    head.eval()
    return (head(features) / temperature).softmax(dim=1)


def new_head(in_dim: int, num_classes: int, cfg: config.TrainConfig):
    """A freshly seeded head, its optimizer and the generator of its batch order."""
    seed_everything(cfg.seed)
    head = MLPHead(in_dim, num_classes, cfg.hidden_dim, cfg.dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return head, optimizer, torch.Generator().manual_seed(cfg.seed)


def train_epoch(head: MLPHead, optimizer, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> None:
    head.train()
    for batch in torch.randperm(len(y), generator=generator).split(batch_size):
        loss = F.cross_entropy(head(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@dataclass
class TrainedHead:
    """The head of the best epoch (lowest validation loss), in eval mode."""

    head: MLPHead
    history: list[dict]  # one record per epoch run: losses and accuracies (metrics.json's "history")
    best_epoch: int


def train_head(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    num_classes: int, cfg: config.TrainConfig, progress: bool = True,
) -> TrainedHead:
    """Train on features until the validation loss has not improved for cfg.patience epochs
    (or cfg.max_epochs); with no validation split, early stopping watches the training loss."""
    head, optimizer, generator = new_head(train_x.shape[1], num_classes, cfg)
    watch_x, watch_y = (val_x, val_y) if len(val_y) else (train_x, train_y)
    history, best_loss, best_epoch, best_state = [], float("inf"), 0, None
    epochs = tqdm(range(1, cfg.max_epochs + 1), desc="training head", unit="epoch", disable=not progress)
    for epoch in epochs:
        train_epoch(head, optimizer, train_x, train_y, cfg.batch_size, generator)
        record = {"epoch": epoch, **_scores(head, "train", train_x, train_y), **_scores(head, "val", watch_x, watch_y)}
        history.append(record)
        if record["val_loss"] < best_loss - 1e-6:
            best_loss, best_epoch, best_state = record["val_loss"], epoch, copy.deepcopy(head.state_dict())
        epochs.set_postfix(val_loss=f"{record['val_loss']:.4f}", val_acc=f"{record['val_accuracy']:.3f}", refresh=False)
        if epoch - best_epoch >= cfg.patience:
            break
    head.load_state_dict(best_state)
    return TrainedHead(head.eval(), history, best_epoch)


@torch.no_grad()
def _scores(head: MLPHead, split: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    head.eval()
    logits = head(x)
    return {f"{split}_loss": float(F.cross_entropy(logits, y)),
            f"{split}_accuracy": float((logits.argmax(1) == y).float().mean())}
