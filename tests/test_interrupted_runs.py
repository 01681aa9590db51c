"""Training runs of train.py, each in a process of its own, interrupted (SIGKILL, Ctrl-C,
SIGTERM) at a chosen point, run two at once, or on a full disk: the rerun extracts only what is
missing, the previous set of outputs stays whole, no features are lost, and a full disk gives one
line. Whole training runs in subprocesses: the system tier (tests/test_interruptions.py checks the
same code in this process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, TINY_SPEC, make_dataset
from test_interruptions import BATCH, PER_CLASS, cached_features, output_set, run, temporaries, train_args
from test_interruptions import small_disk  # noqa: F401 (a fixture)
from test_training import backbone_calls  # noqa: F401 (a fixture)
from vehicle_classifier import config, fileio
from vehicle_classifier.artifact import read_metadata

pytestmark = pytest.mark.system


# train.py in a subprocess, with the tiny backbone registered and a hook that signals the process
# itself at a chosen point: the Nth call of `target` that meets `condition` (before or after the
# real call). SIGINT stands for Ctrl-C at a terminal, where Python raises KeyboardInterrupt; a
# suite started in the background by a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and Python then leaves it ignored (so does train.py, as nohup means): the driver
# puts Python's Ctrl-C handler back, or the signal would be lost and the run would finish.
DRIVER = textwrap.dedent("""
    import functools, importlib, os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from vehicle_classifier import registry
    registry.BACKBONES[{spec.name!r}] = registry.BackboneSpec({spec.name!r}, {spec.architecture!r},
                                                            model_kwargs={spec.model_kwargs!r})
    module_name, _, attr = {target!r}.rpartition(".")
    owner = importlib.import_module(module_name.split(":")[0])
    for part in module_name.split(":")[1:]:
        owner = getattr(owner, part)
    real, calls = getattr(owner, attr), [0]

    @functools.wraps(real)
    def hooked(*args, **kwargs):
        match = {condition}
        calls[0] += bool(match)
        hit = match and calls[0] == {nth}
        if hit and {when!r} == "before":
            os.kill(os.getpid(), {signum})
        result = real(*args, **kwargs)
        if hit and {when!r} == "after":
            os.kill(os.getpid(), {signum})
        return result

    setattr(owner, attr, hooked)
    import train
    sys.exit(train.main({args!r}))
""")


def run_train(args, timeout=300):
    """train.py with the tiny backbone registered, nothing hooked."""
    return run_hooked(args, "os.getpid", 0, "after", 0, condition="False", timeout=timeout)


def run_hooked(args, target, nth, when, signum, condition="True", timeout=300):
    code = DRIVER.format(repo=str(REPO), spec=TINY_SPEC, target=target, nth=nth, when=when, signum=int(signum),
                         condition=condition, args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# --- extraction resumes ---------------------------------------------------------------------
@pytest.mark.parametrize("signum, nth, when", [
    (signal.SIGKILL, 1, "before"),  # before the first batch is stored: nothing to keep
    (signal.SIGINT, 3, "after"),  # Ctrl-C after three batches (a kill mid-way: the next test)
])
def test_a_rerun_after_an_interrupted_extraction_extracts_only_the_missing_photos(
        tmp_path, tiny_weights, backbone_calls, signum, nth, when):
    data, out, cache = make_dataset(tmp_path / "data", PER_CLASS), tmp_path / "out", tmp_path / "cache"
    done = run_hooked(train_args(data, out, cache, tiny_weights), "vehicle_classifier.training.features:FeatureCache.add",
                      nth, when, signum)
    if signum == signal.SIGKILL:
        assert done.returncode == -signal.SIGKILL
    else:
        assert done.returncode == 130, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted: ") and "unchanged" in last and "kept in the cache" in last, last
        assert "Traceback" not in done.stderr
    kept = cached_features(cache)
    assert len(kept) == (nth if when == "after" else nth - 1) * BATCH  # every finished batch, as it finished
    assert not out.joinpath(config.ARTIFACT_FILE).exists()

    metrics = run(data, out, tiny_weights, cache)
    assert backbone_calls["images"] == 2 * PER_CLASS - len(kept)  # only the missing photos
    assert metrics["summary"]["images_found"] == 2 * PER_CLASS
    assert len(cached_features(cache)) == 2 * PER_CLASS
    assert len(list(cache.glob("*/*.safetensors"))) == 1  # merged once complete
    assert not temporaries(cache) and not temporaries(out)


def test_a_kill_in_the_middle_of_a_cache_write_leaves_no_damaged_shard(tmp_path, tiny_weights, backbone_calls):
    """SIGKILL inside the second shard's write, after its bytes are written but before they are
    renamed into place: the rerun removes the temporary (and older runs' leftovers in the output
    folder) and extracts all but the first batch."""
    data, out, cache = make_dataset(tmp_path / "data", PER_CLASS), tmp_path / "out", tmp_path / "cache"
    shard = f"str(args[1]).startswith({str(cache)!r}) and str(args[1]).endswith('.safetensors')"
    done = run_hooked(train_args(data, out, cache, tiny_weights), "vehicle_classifier.fileio:os.replace", 2,
                      "before", signal.SIGKILL, condition=shard)
    assert done.returncode == -signal.SIGKILL
    assert len(temporaries(cache)) == 1 and len(cached_features(cache)) == BATCH
    leftover = out / ".model.safetensors.k3x9q_1a.tmp.safetensors"  # as killed runs of 0.2.0 left them
    leftover.write_bytes(b"\0" * 1000)

    run(data, out, tiny_weights, cache)
    assert backbone_calls["images"] == 2 * PER_CLASS - BATCH
    assert not temporaries(cache) and not leftover.exists()


# --- the outputs are one set ----------------------------------------------------------------
def test_sigterm_while_publishing_leaves_the_old_set_and_says_so(tmp_path, tiny_weights):
    """`kill` (SIGTERM, as `docker stop` sends) winds down as Ctrl-C does: before the commit, the
    old set, whole, and a message saying so."""
    data, out, cache = make_dataset(tmp_path / "data", PER_CLASS), tmp_path / "out", tmp_path / "cache"
    args = train_args(data, out, cache, tiny_weights)
    run(data, out, tiny_weights, cache)
    before = output_set(out)
    # The third rename into the output folder: after the lock's owner file and the journal.
    second = run_hooked([*args, "--seed", 5], "vehicle_classifier.fileio:os.replace", 3, "before", signal.SIGTERM,
                        condition=f"str(args[1]).startswith({str(out)!r})")
    assert second.returncode == 130, second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith(f"interrupted: {out} is unchanged and holds the previous")
    assert output_set(out) == before and not fileio.in_transition(out) and not temporaries(out)


# --- two runs at once -----------------------------------------------------------------------
def test_two_runs_sharing_a_cache_lose_no_features(tmp_path, tiny_weights, backbone_calls):
    data, cache = make_dataset(tmp_path / "data", PER_CLASS), tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:  # both start at once
        results = list(pool.map(run_train, [train_args(data, tmp_path / f"out{i}", cache, tiny_weights) for i in (1, 2)]))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert sum("extracting features" in r.stderr for r in results) >= 1
    assert len(cached_features(cache)) == 2 * PER_CLASS
    for i in (1, 2):
        version = read_metadata(tmp_path / f"out{i}" / config.ARTIFACT_FILE)["model_version"]
        assert json.loads((tmp_path / f"out{i}" / config.METRICS_FILE).read_text())["model_version"] == version

    run(data, tmp_path / "out3", tiny_weights, cache)
    assert backbone_calls["images"] == 0  # all of both runs' features are there


# --- a full disk ----------------------------------------------------------------------------
def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path, small_disk, tiny_weights):
    data, out = make_dataset(tmp_path / "data", PER_CLASS), small_disk / "out"
    done = run_train(train_args(data, out, tmp_path / "cache", tiny_weights))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert errors[0].endswith(f"(nothing in {out} was changed)")
    assert str(out) in errors[0] and "disk is full" in errors[0]
    assert not out.exists()  # the run made it and left nothing in it: not even its lock
