"""The run's exported graphs (the float graph it extracts with, its int8 copy), kept in the
feature cache beside the features they made (one folder per cache key: backbone, weights,
preprocessing, decoder): a rerun reads them (~0.1 s) instead of converting the backbone
(~1-2 s) and quantizing it (13-50 s on 2 cores) again. The int8 copy's calibration crops come
from the first run's training photos; every run's fidelity gate measures the copy it publishes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .. import config
from ..export import saved_files
from ..fileio import WriteError, write_file
from ..runtime import openvino_core

log = logging.getLogger(__name__)
GRAPHS = "graphs"  # the subfolder of a cache key's folder


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
    return cached_graph(folder, config.INT8_FILES, make)
