"""The run's exported graphs (the float graph it extracts with, its int8 copy), kept in the
feature cache beside the features they made (one folder per cache key: backbone, weights,
preprocessing, decoder): a rerun reads them (~0.1 s) instead of converting the backbone
(~2-4 s) and quantizing it (11-16 s on 2 cores) again. The int8 copy's calibration crops come
from the first run's training photos; every run's fidelity gate measures the copy it publishes,
on features through it that are kept beside it (int8_features): a rerun or --force runs the
int8 graph only on validation photos it has not seen."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from .. import config
from ..export import saved_files
from ..fileio import WriteError, write_file
from ..runtime import openvino_core
from .features import FeatureCache

log = logging.getLogger(__name__)
GRAPHS = "graphs"  # the subfolder of a cache key's folder
INT8_FEATURES = "int8-features"  # in GRAPHS: features through the int8 graph kept there


def cached_graph(folder: Path, names: tuple[str, str], make: Callable[[], object]):
    """The graph saved as `names` (config.EXPORT_FILES or INT8_FILES) in `folder`/graphs, or
    `make()`'s, saved there for the next run (a graph that cannot be read, or saved, is only
    a slower run)."""
    where = Path(folder) / GRAPHS
    try:
        if (where / names[0]).is_file():
            return openvino_core().read_model(str(where / names[0]))
    except RuntimeError as exc:  # a damaged file: made again, and replaced
        log.warning("remaking the cached graph %s: %s", where / names[0], str(exc).splitlines()[0])
    graph = make()
    try:
        files = saved_files(graph, names)
        for name in reversed(names):  # the weights before the graph that names them
            write_file(where / name, files[name])
    except WriteError as exc:
        log.warning("the graph is not kept for the next run: %s", exc)
    return graph


def float_graph(folder: Path, make: Callable[[], object]):
    return cached_graph(folder, config.EXPORT_FILES, make)


def int8_graph(folder: Path, make: Callable[[], object]):
    def remade():  # a new int8 graph: the features through the one it replaces are not its own
        shutil.rmtree(Path(folder) / GRAPHS / INT8_FEATURES, ignore_errors=True)
        return make()

    return cached_graph(folder, config.INT8_FILES, remade)


def int8_features(folder: Path) -> FeatureCache:
    """The features (by file digest) through the int8 graph int8_graph keeps in `folder`."""
    return FeatureCache(Path(folder) / GRAPHS, INT8_FEATURES)
