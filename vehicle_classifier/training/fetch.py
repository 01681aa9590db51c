"""The data set on first run: when the default data folder is missing, the public Kaggle set is
downloaded with kagglehub (public data needs no credentials; kagglehub's own cache and settings
apply) and its class folders copied into config.DATA_DIR, with progress. Offline or refused, a
two-line error says where to get it and where to put it by hand."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from .. import config
from ..data import DataError

log = logging.getLogger(__name__)

KAGGLE_PAGE = f"https://www.kaggle.com/datasets/{config.KAGGLE_DATASET}"


def ensure_dataset(data_dir: Path) -> bool:
    """Fetch the Kaggle set into `data_dir` when it is the default data folder and missing;
    whether it did. Any other missing folder is left to the scan's own error."""
    data_dir = Path(data_dir)
    if data_dir.exists() or data_dir.resolve() != config.DATA_DIR.resolve():
        return False
    log.info("%s not found: fetching the public data set %s from Kaggle", data_dir, config.KAGGLE_DATASET)
    lay_out(class_folders(download()), data_dir)
    return True


def download() -> Path:
    """The data set's folder in kagglehub's cache (downloaded unless it is there)."""
    import kagglehub

    try:
        return Path(kagglehub.dataset_download(f"{config.KAGGLE_DATASET}/versions/{config.KAGGLE_VERSION}"))
    except Exception as exc:  # kagglehub raises requests', its own and OS errors: each one line here
        # requests' connection errors are OSErrors whose text is a page of pool internals.
        reason = "no connection" if isinstance(exc, OSError) else (str(exc).splitlines() or [""])[0][:160]
        raise DataError(f"could not download the data set {config.KAGGLE_DATASET} from Kaggle "
                        f"({type(exc).__name__}: {reason})\nget it by hand from {KAGGLE_PAGE} and put its "
                        f"{' and '.join(f'{c}/' for c in config.KAGGLE_CLASSES)} folders in {config.DATA_DIR}/") from None


def class_folders(downloaded: Path) -> Path:
    """The folder of the download that holds the class folders (the set's Car-Bike-Dataset/)."""
    for folder in [downloaded, *sorted(p for p in downloaded.rglob("*") if p.is_dir())]:
        if all((folder / name).is_dir() for name in config.KAGGLE_CLASSES):
            return folder
    raise DataError(f"the Kaggle download in {downloaded} has no {' and '.join(config.KAGGLE_CLASSES)} folders; "
                    f"put them in {config.DATA_DIR}/ by hand (from {KAGGLE_PAGE})")


def lay_out(source: Path, data_dir: Path) -> None:
    """Copy the class folders of `source` into `data_dir`, which appears whole or not at all: the
    copy goes to a partial folder beside it, renamed once complete (a leftover one is redone)."""
    files = [p for name in config.KAGGLE_CLASSES for p in sorted((source / name).rglob("*")) if p.is_file()]
    partial = data_dir.with_name(f".{data_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for path in tqdm(files, desc=f"copying into {data_dir}", unit="img"):
        target = partial / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    os.replace(partial, data_dir)
