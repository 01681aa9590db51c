"""The small MLP head trained on frozen [CLS] features."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Module):
    """features -> Linear -> GELU -> Dropout -> Linear -> logits; hidden_dim=0 is a linear probe."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.config = dict(in_dim=in_dim, num_classes=num_classes, hidden_dim=hidden_dim, dropout=dropout)
        if hidden_dim:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))

    def forward(self, features):
        return self.net(features)
