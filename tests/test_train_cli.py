"""train.py as a user runs it, in short runs of its own: --help, and one-line errors (no weights
offline, bad arguments). tests/test_train_cli_runs.py runs it whole: the real ViT-S/16
architecture (random weights in the official DINO format) on real photos, and reruns."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import REPO, sample_photos
from vehicle_classifier import config, registry
from vehicle_classifier.training import cli
from vehicle_classifier.backbone import create_backbone

pytestmark = pytest.mark.integration


def run_train(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def vits16_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino") / "dino_deitsmall16_pretrain.pth"
    torch.save(create_backbone(registry.BACKBONES["dino-vits16"].architecture).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A small image folder of real photos (symlinks; nothing is copied)."""
    root = tmp_path_factory.mktemp("photos") / "Car-Bike"
    for label in ("Bike", "Car"):
        (root / label).mkdir(parents=True)
        for photo in sample_photos(label)[:14]:
            (root / label / photo.name).symlink_to(photo)
    return root


def test_help_documents_every_flag():
    parser_help = run_train("--help").stdout
    actions = [a for a in train.build_parser()._actions if a.option_strings]
    assert len(actions) >= 19
    for action in actions:
        assert action.help, action.option_strings
        assert any(opt in parser_help for opt in action.option_strings)


def test_offline_without_weights_fails_fast_in_a_few_lines(tmp_path, photo_folder):
    started = time.monotonic()
    result = run_train("--data-dir", photo_folder, "--output-dir", tmp_path / "out",
                       env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "--weights" in result.stderr and "dino_deitsmall16_pretrain.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3
    assert elapsed < 40  # not huggingface_hub's minute of retries
    assert not (tmp_path / "out" / config.ARTIFACT_FILE).exists()


@pytest.mark.parametrize("make_args, words", [
    (lambda tmp, w: ["--data-dir", tmp / "missing", "--weights", w], "data directory not found"),
    (lambda tmp, w: ["--data-dir", REPO / "tests", "--weights", tmp / "nope.pth"], "class sub-folders|weights file not found"),
])
def test_bad_arguments_give_one_line(tmp_path, vits16_weights, make_args, words):
    result = run_train(*make_args(tmp_path, vits16_weights), "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert re.search(words, lines[0])


def test_sigterm_winds_down_the_run_in_its_own_process_only():
    """In train.py's process SIGTERM is Ctrl-C; in a forked decoding worker (which inherits the
    handler, and which the DataLoader ends with SIGTERM) it ends the worker, as by default."""
    handler = cli._interrupt_in(os.getpid())
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGTERM, None)
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's may run here
        try:
            signal.signal(signal.SIGTERM, handler)
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            os._exit(3)  # reached only if SIGTERM did not end the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
