"""torch on this machine's devices: CUDA checks that leave CUDA alone, bf16 autocast, and thread
counts. Training, batch prediction and the service's torch path (RUNTIME=torch, DEVICE=cuda)
use it; the CPU service runs the exported model through OpenVINO and never imports this."""

from __future__ import annotations

import contextlib

import torch

from . import UserError


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's thread count for the calling thread, inside the block. OpenMP keeps the count
    per thread: a server's request threads start from OMP_NUM_THREADS, not from warm_up's."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


class DeviceUnavailable(UserError, ValueError):
    """A CUDA device was asked for where torch finds none."""


def check_device(device: torch.device) -> None:
    """Raise DeviceUnavailable, in one line, when `device` is a CUDA device torch does not have.

    Counted by torch.cuda.device_count(), not is_available(): the latter initialises the CUDA
    driver (cuInit), after which a forked child (a gunicorn worker) cannot use CUDA; the count
    comes from NVML and leaves CUDA alone wherever NVML answers (torch's docs, "poison fork")."""
    if device.type != "cuda":
        return
    if not torch.backends.cuda.is_built():
        raise DeviceUnavailable(f"{device} asked for, but this torch build ({torch.__version__}) has no CUDA "
                                "support: install a CUDA build of torch, or use the cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceUnavailable(f"{device} asked for, but torch ({torch.__version__}) finds no CUDA device here "
                                "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them): use the cpu")
    if (device.index or 0) >= count:
        raise DeviceUnavailable(f"{device} asked for, but torch finds {count} CUDA device(s) here")
