"""audit.png: a contact sheet of the top suspects, the photos a person should look at first."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from ..images import ImageError, center_crop, open_image

COLUMNS = 6
SUSPECTS, PAIRS, OUTLIERS = 12, 3, 6  # tiles of each kind at most


def _tile(ax, path: Path, preprocessing: dict, title: str, color: str = "black") -> None:
    ax.set_axis_off()
    try:
        ax.imshow(center_crop(open_image(path, preprocessing["resize_size"]), preprocessing))
    except ImageError:
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=7.5, color=color)


def _label_caption(item: dict) -> str:
    if item["suggested"] == item["given"]:
        return f"{item['given']} ({item['score']:.2f})"
    return f"{item['given']} -> {item['suggested']}? ({item['score']:.2f})"


def _tiles(report: dict) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Rows of (section title, [(relative path, caption, color)...])."""
    suspects = [(item["path"], f"{_label_caption(item)}\n{Path(item['path']).name[:22]}", "red" if item["issue"] else "black")
                for item in report["label_issues"][:SUSPECTS]]
    pairs = [(path, f"{pair['similarity']:.2f}{' across split' if pair['crosses_split'] else ''}\n{Path(path).name[:22]}",
              "red" if pair["crosses_split"] else "black")
             for pair in report["near_duplicates"][:PAIRS] for path in pair["paths"]]
    outliers = [(item["path"], f"neither? {item['score']:.2f}\n{Path(item['path']).name[:22]}", "black")
                for item in report["outliers"][:OUTLIERS]]
    return [(title, tiles) for title, tiles in (
        ("Most suspicious labels: given -> suggested (label quality); red: a label issue", suspects),
        ("Near-duplicate pairs (similarity)", pairs),
        ("Least like either class", outliers)) if tiles]


def contact_sheet_png(report: dict, data_dir: Path, preprocessing: dict) -> bytes:
    """The most suspicious labels, the closest near-duplicate pairs and the strongest outliers,
    each photo as the backbone sees it, captioned; as PNG bytes."""
    sections = _tiles(report)
    rows = [(title, tiles[start:start + COLUMNS]) for title, tiles in sections for start in range(0, len(tiles), COLUMNS)]
    fig = Figure(figsize=(1.75 * COLUMNS, 2.05 * max(1, len(rows))), layout="constrained")
    subfigs = fig.subfigures(max(1, len(rows)), 1, squeeze=False)[:, 0]
    shown = set()
    for subfig, (title, tiles) in zip(subfigs, rows):
        if title not in shown:
            subfig.suptitle(title, fontsize=9, x=0.01, ha="left")
            shown.add(title)
        axes = subfig.subplots(1, COLUMNS)
        for ax in axes[len(tiles):]:
            ax.set_axis_off()
        for ax, (path, caption, color) in zip(axes, tiles):
            _tile(ax, data_dir / path, preprocessing, caption, color)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=85)
    return buffer.getvalue()
