"""Training runs that survive interruption and each other: a kill at any point of extraction
loses only the batches in flight, a kill at any point of the final writes leaves the previous
set of outputs, two runs at once never mix their outputs or lose features, and a full or
read-only disk gives one line and no leftovers. Here in this process (runs, forked writers,
injected faults); tests/test_interrupted_runs.py kills whole runs of train.py in processes of
their own (the system tier)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load, save

from conftest import REPO, TINY_SPEC, make_dataset
from test_training import backbone_calls  # noqa: F401 (a fixture)
from vehicle_classifier import config, fileio
from vehicle_classifier.training.job import Job
from vehicle_classifier.training.run import run_training
from vehicle_classifier.artifact import read_metadata
from vehicle_classifier.backbone import WeightsError
from vehicle_classifier.fileio import LockedError, WriteError, exclusive, publish, recover

pytestmark = pytest.mark.integration

BATCH = 4
PER_CLASS = 10  # 20 photos: 5 batches of 4


def cached_features(cache: Path) -> set[str]:
    """Digests persisted in the cache folder, read from the shards as a rerun reads them."""
    digests = set()
    for shard in cache.glob("*/*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            digests.update(f.keys())
    return digests


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f".*{fileio.TEMP_SUFFIX}")]


def train_args(data, out, cache, weights):
    return ["--data-dir", data, "--output-dir", out, "--cache-dir", cache, "--weights", weights,
            "--backbone", TINY_SPEC.name, "--extract-batch-size", BATCH, "--max-epochs", 5, "--device", "cpu",
            "--neither-dir", ""]  # no 'neither' images: the cache counts below are the dataset's photos


def run(data, out, weights, cache, **kw):
    """run_training in this process, as train_args configures it."""
    cfg = config.TrainConfig(backbone=TINY_SPEC.name, extract_batch_size=BATCH, max_epochs=5, neither_dir="", **kw)
    return run_training(Job(data, out, cfg, weights, cache, spec=TINY_SPEC))


# --- extraction resumes ---------------------------------------------------------------------


def test_a_torn_or_misplaced_shard_is_ignored(tmp_path, tiny_weights, backbone_calls, caplog):
    """A shard cut short (as a non-atomic writer would leave it) or one that names another
    cache key (a copied folder): both are refused with a warning and their photos redone."""
    data, cache = make_dataset(tmp_path / "data", 4), tmp_path / "cache"
    run(data, tmp_path / "a", tiny_weights, cache)
    (shard,) = cache.glob("*/*.safetensors")
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2])
    (shard.parent / "copied.safetensors").write_bytes(save(load(blob), metadata={"cache_key": "another-key"}))
    backbone_calls["images"] = 0
    with caplog.at_level("WARNING"):
        run(data, tmp_path / "b", tiny_weights, cache)
    assert backbone_calls["images"] == 8
    ignored = [r.getMessage() for r in caplog.records if "ignoring unreadable feature cache shard" in r.getMessage()]
    assert len(ignored) == 2 and any("another-key" in m for m in ignored)


# --- the outputs are one set ----------------------------------------------------------------
def output_set(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def kill_publish_at(folder: Path, files: dict[str, bytes], nth: int) -> bool:
    """publish() in a forked child that SIGKILLs itself at its nth file-system step (a write,
    fsync, link, rename or unlink); True if it was killed, False if it finished first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        steps = [0]

        def step(real):
            def counted(*args, **kwargs):
                steps[0] += 1
                if steps[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            return counted

        for name in ("fsync", "link", "replace", "unlink", "write"):
            setattr(os, name, step(getattr(os, name)))
        try:
            publish(folder, files, replaces=config.OUTPUT_FILES)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def test_a_kill_at_any_step_of_the_final_writes_leaves_one_complete_set(tmp_path):
    old = {config.ARTIFACT_FILE: b"old model", config.METRICS_FILE: b"old metrics", config.SPLIT_FILE: b"old split",
           config.HISTORY_PLOT: b"old curves", config.CONFUSION_PLOT: b"old matrix"}
    new = {config.ARTIFACT_FILE: b"new model" * 1000, config.METRICS_FILE: b"new metrics",
           config.SPLIT_FILE: b"new split", config.HISTORY_PLOT: b"new curves"}  # no test split: no matrix
    outcomes, nth = [], 1
    while True:
        folder = tmp_path / f"kill-{nth}"
        publish(folder, old)
        killed = kill_publish_at(folder, new, nth)
        seen = output_set(folder)
        # Right after the kill: one whole set, or a publish caught mid-swap (flagged, readers wait).
        assert seen in (old, new) or fileio.in_transition(folder), nth
        recover(folder)  # what the next run does first
        fileio.clean_temporaries(folder)
        assert output_set(folder) in (old, new), nth
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [], nth
        outcomes.append(output_set(folder) == new)
        if not killed:
            break
        nth += 1
    assert nth > 15  # every step was tried: the stage, the journal, each rename, the commit
    # Killed before the journal's removal: the old set; after it: the new one; never in between.
    assert outcomes == sorted(outcomes) and outcomes[0] is False and outcomes[-1] is True


def test_outputs_carry_the_artifacts_model_version(tiny_model_dir):
    version = read_metadata(tiny_model_dir / config.ARTIFACT_FILE)["model_version"]
    for name in (config.METRICS_FILE, config.SPLIT_FILE):
        assert json.loads((tiny_model_dir / name).read_text())["model_version"] == version


# --- two runs at once -----------------------------------------------------------------------
def lock_holder(folder: Path) -> subprocess.Popen:
    """Another process, holding `folder`'s lock (exclusive, wait=False) once this returns, until
    its stdin is closed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vehicle_classifier.fileio import exclusive\n"
         f"with exclusive({str(folder)!r}, 'output folder', wait=False):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_the_same_output_folder_stops_naming_the_first(tmp_path, tiny_weights):
    out = tmp_path / "out"
    holder = lock_holder(out)
    try:
        in_use = rf"in use by another run \(pid {holder.pid} on .*choose another output folder"
        with pytest.raises(LockedError, match=in_use) as info:
            run(make_dataset(tmp_path / "data", 4), out, tiny_weights, tmp_path / "cache")
        assert info.value.setting == "output_dir"  # train.py leads the line with --output-dir
    finally:
        holder.communicate("", timeout=30)
    assert not out.exists()  # the holder made it and left nothing in it: it removed it


def test_a_failed_first_run_leaves_no_lock_behind(tmp_path, tiny_weights):
    data, bad_weights = make_dataset(tmp_path / "data", 4), tmp_path / "bad.pth"
    bad_weights.write_bytes(b"not a checkpoint")
    fresh, empty = tmp_path / "new" / "out", tmp_path / "empty"
    empty.mkdir()
    for out in (fresh, empty):
        with pytest.raises(WeightsError, match="cannot read weights file"):
            run(data, out, bad_weights, tmp_path / "cache")
    assert not (tmp_path / "new").exists()  # the folders the run made, removed
    assert list(empty.iterdir()) == []  # a folder it did not make, kept, without the lock's files
    run(data, fresh, tiny_weights, tmp_path / "cache")  # a run that publishes leaves no lock files either
    assert output_set(fresh).keys() >= {config.ARTIFACT_FILE}
    assert not (fresh / fileio.LOCK_FILE).exists() and not (fresh / fileio.OWNER_FILE).exists()


def test_a_run_waiting_for_a_lock_whose_folder_is_removed_holds_the_lock_it_gets(tmp_path):
    """The first holder made the folder and leaves it empty, so it removes the lock's files and
    the folder as it releases the lock; the run waiting for it makes the folder again (or takes
    the lock file made in between) and holds a lock that excludes a third."""
    out = tmp_path / "out"
    holder = lock_holder(out)
    third = [sys.executable, "-c", f"from vehicle_classifier.fileio import exclusive\nwith exclusive({str(out)!r}, "
             "'folder', wait=False):\n    pass"]
    lock = exclusive(out, "folder", wait=True)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lock.__enter__)
        holder.communicate("", timeout=30)
        waiting.result(timeout=30)  # the lock, taken
    try:
        assert (out / fileio.LOCK_FILE).is_file()
        refused = subprocess.run(third, cwd=REPO, capture_output=True, text=True)
        assert refused.returncode == 1 and "is in use by another run" in refused.stderr
    finally:
        lock.__exit__(None, None, None)
    # Made again by the waiting run, or taken over by it before the holder's rmdir: left empty.
    assert not out.exists() or list(out.iterdir()) == []


# --- full and read-only disks ---------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 48 KiB; skipped where mounting is not permitted (not root, or a container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_extraction_keeps_the_finished_batches(tmp_path, small_disk, tiny_weights):
    data, cache = make_dataset(tmp_path / "data", 3 * PER_CLASS), small_disk / "cache"
    with pytest.raises(WriteError, match=rf"cannot write {small_disk}.*disk is full.*a rerun continues from them"):
        run(data, tmp_path / "out", tiny_weights, cache)
    kept = cached_features(cache)
    assert 0 < len(kept) < 6 * PER_CLASS and len(kept) % BATCH == 0
    assert not temporaries(cache)


@pytest.mark.parametrize("failing_fsync", [1, 3, 6])  # a staged output, the journal, the swap
def test_enospc_from_fsync_leaves_the_old_set(tmp_path, monkeypatch, failing_fsync):
    """Without a small disk to fill (no root): ENOSPC injected where network and delayed-allocation
    file systems report it, at fsync; the same one line, the previous set, nothing left over."""
    old = {config.ARTIFACT_FILE: b"old model", config.METRICS_FILE: b"old metrics"}
    publish(tmp_path, old)
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] == failing_fsync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(WriteError, match=rf"cannot write {tmp_path}/.*No space left on device; the disk is full.*"
                                         rf"\(nothing in {tmp_path} was changed\)"):
        publish(tmp_path, {config.ARTIFACT_FILE: b"new model", config.METRICS_FILE: b"new metrics",
                           config.SPLIT_FILE: b"new split"})
    assert output_set(tmp_path) == old and not temporaries(tmp_path) and not fileio.in_transition(tmp_path)
    assert not (tmp_path / fileio.BACKUP_DIR).exists()


def test_a_read_only_folder_gives_one_line(small_disk):
    publish(small_disk / "models", {config.ARTIFACT_FILE: b"old model"})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteError, match=rf"cannot write {small_disk}/models/{config.ARTIFACT_FILE}: Read-only"):
        publish(small_disk / "models", {config.ARTIFACT_FILE: b"new model"})
    assert output_set(small_disk / "models") == {config.ARTIFACT_FILE: b"old model"}
    with pytest.raises(WriteError, match=rf"cannot write {small_disk}/out.*read-only.*writable folder"):
        publish(small_disk / "out", {config.ARTIFACT_FILE: b"model"})
    with pytest.raises(WriteError, match="read-only"):
        with exclusive(small_disk / "cache", "feature cache folder", wait=True):
            pass
