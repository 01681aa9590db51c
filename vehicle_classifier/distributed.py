"""Data-parallel runs under torchrun: one process per GPU (on one node or several), the files
sharded by rank, each rank writing its own part, rank 0 merging the parts.

    torchrun --nproc-per-node=4 train.py ...                    # one node, four GPUs
    torchrun --nproc-per-node=gpu -m vehicle_classifier.offline.batch ...

torchrun tells each process its place through the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): that is its documented interface, read here and by
torch.distributed itself. A plain run has none of them and is a group of one: nothing is
initialised, nothing is sharded, nothing changes. The processes exchange only small Python
objects (which files failed, which rows were written) through gloo; features and rows go
through files, so the output and cache directories must be on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# Ranks wait at the merge for the slowest shard: allow for a long extraction.
MERGE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Group:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the processes on this node, which share its cores

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: every world_size-th item from its rank (shares differ by one at most)."""
        return items[self.rank :: self.world_size]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere). Also a barrier: it
        returns on rank 0 once every rank has handed its object over."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def device(self, requested: str = "auto") -> torch.device:
        """The device this rank runs on: `auto` is CUDA when available, and under torchrun each
        process takes the GPU of its local rank (cuda:LOCAL_RANK)."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device


SINGLE = Group()


def part_suffix(group: Group) -> str:
    """What each rank's part file carries in its name, e.g. `.part1-of-4`."""
    return f".part{group.rank}-of-{group.world_size}"


@contextlib.contextmanager
def process_group():
    """This process's Group for the duration of the block: under torchrun the gloo process
    group is joined (gloo: only small objects travel, and it runs on CPU and GPU machines
    alike), otherwise the group of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE
        return
    import torch.distributed as dist

    group = Group(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")),
                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if dist.is_initialized():  # inside another process_group block (one job, several steps)
        yield group
        return
    dist.init_process_group("gloo", timeout=MERGE_TIMEOUT)
    try:
        yield group
    finally:
        dist.destroy_process_group()
