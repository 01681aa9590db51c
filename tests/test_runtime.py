"""The OpenVINO backbone agrees with torch, and concurrent requests are batched correctly."""

import multiprocessing
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import TINY_SPEC
from vehicle_classifier.backbone import create_backbone
from vehicle_classifier.export import to_openvino
from vehicle_classifier.runtime import OpenVINOModel, usable_cores
from vehicle_classifier.model.batcher import Batcher

pytestmark = pytest.mark.integration


def openvino(backbone, precision: str, mode: str = "latency"):
    """The backbone through OpenVINO, torch tensors in and out (as training's extraction feeds it)."""
    model = OpenVINOModel(to_openvino(backbone, torch.zeros(1, 3, 32, 32)), precision, mode)
    model.torch = lambda images: torch.from_numpy(model(images.numpy())[0])
    return model


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    return create_backbone(TINY_SPEC.architecture, TINY_SPEC.model_kwargs).eval()


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.05)])
def test_openvino_features_match_torch_fp32(tiny_backbone, precision, tolerance):
    images = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        expected = tiny_backbone(images)
    fast = openvino(tiny_backbone, precision)
    got = fast.torch(images)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 1 - tolerance
    if precision == "fp32":
        assert torch.allclose(got, expected, atol=tolerance)
    assert torch.equal(fast.torch(images[:1]), fast.torch(images[:1]))  # batch 1 too, deterministic


def test_map_returns_every_batch_in_order_with_its_tag(tiny_backbone):
    fast = openvino(tiny_backbone, "fp32", mode="throughput")
    batches = [(f"b{i}", torch.randn(n, 3, 32, 32).numpy()) for i, n in enumerate([3, 1, 4, 2, 5])]
    results = list(fast.map(iter(batches)))
    assert [tag for tag, _ in results] == [tag for tag, _ in batches]
    for (_, batch), (_, features) in zip(batches, results):
        assert torch.allclose(torch.from_numpy(features), torch.from_numpy(fast(batch)[0]), atol=1e-5)


def test_adaptive_mode_answers_lone_and_overlapping_calls_alike(tiny_backbone):
    """A lone call runs on the one stream over every core, overlapping calls on a stream each:
    the same features either way, and every caller gets its own."""
    fast = openvino(tiny_backbone, "fp32", mode="adaptive")
    images = [torch.randn(n, 3, 32, 32) for n in (1, 2, 3, 1, 2, 4, 1, 3)]
    alone = [fast.torch(x) for x in images]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(fast.torch, images))
    for a, b in zip(alone, together):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert fast._running == 0


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores to share")
def test_threads_are_pinned_only_by_a_process_that_takes_every_core(tiny_backbone):
    """A process compiled for fewer threads than its cores (a Ray actor, one of several gunicorn
    workers) leaves them unpinned: pinned, each such process put its threads on the first cores
    (three one-thread actors on one core of two, 0.53x the local rate; docs/batch-prediction.md)."""
    model = openvino(tiny_backbone, "fp32", mode="throughput")
    for threads, pinned in ((1, False), (usable_cores(), True)):
        model.compile(threads=threads)
        compiled = model._idle.queue[0].get_compiled_model()
        assert compiled.get_property("ENABLE_CPU_PINNING") is pinned
        assert model.torch(torch.randn(2, 3, 32, 32)).shape[0] == 2


def test_openvino_sends_no_telemetry(tiny_backbone):
    """OpenVINO's converter would start a child process to send usage events; ours never does."""
    openvino(tiny_backbone, "fp32")
    assert sys.modules.get("openvino_telemetry") is None
    assert multiprocessing.active_children() == []


def test_batcher_answers_each_caller_with_its_own_results_in_shared_batches():
    batches = []
    first_running, release = threading.Event(), threading.Event()

    def run(items):
        batches.append(list(items))
        first_running.set()
        release.wait(timeout=10)
        return [item * 10 for item in items]

    batcher = Batcher(run, max_items=4)
    answers = {}

    def call(name, items):
        answers[name] = batcher(items)

    first = threading.Thread(target=call, args=("first", [1]))
    first.start()
    assert first_running.wait(timeout=10)
    # While the first batch runs, three callers queue up: 2 + 1 items fit one batch of 4, the
    # last caller's 3 items do not and go in the batch after.
    waiting = [threading.Thread(target=call, args=(name, items))
               for name, items in (("a", [2, 3]), ("b", [4]), ("c", [5, 6, 7]))]
    for thread in waiting:
        thread.start()
        time.sleep(0.05)  # arrival order a, b, c
    release.set()
    for thread in [first, *waiting]:
        thread.join(timeout=10)
    assert answers == {"first": [10], "a": [20, 30], "b": [40], "c": [50, 60, 70]}
    assert batches == [[1], [2, 3, 4], [5, 6, 7]]


def test_batcher_passes_a_failure_to_every_caller_of_that_batch_and_recovers():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("forward failed")
        return items

    batcher = Batcher(run, max_items=8)
    with pytest.raises(RuntimeError, match="forward failed"):
        batcher([1])
    assert batcher([2, 3]) == [2, 3]  # the next batch runs normally
