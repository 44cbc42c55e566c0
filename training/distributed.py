"""Data-parallel training under ``torchrun``: process group, rank, reductions.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` then joins the process group (nccl on CUDA, gloo on CPU). Every
process samples its own patches from a rank-seeded generator, DDP averages the
gradients, metrics are summed with ``all_reduce`` and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes (in place; a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts them at each forward, but the last forward of each
        process updates its own copy; sync before validating or saving.
        """
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, clean: bool = True) -> None:
        """Leave the process group if :func:`setup` joined it; on a ``clean`` exit first
        wait for every process (one leaving while a peer still communicates can abort
        gloo). After an error no barrier: the peers may wait in another collective."""
        if self.owns_group and dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def launched_by_torchrun() -> bool:
    """True when the environment of ``torchrun`` (or ``torch.distributed.run``) is set."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by torchrun; return the context and device.

    On CUDA each process takes GPU ``LOCAL_RANK`` and nccl; on CPU gloo. A group
    that the caller initialised already is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), _local_rank())
    elif launched_by_torchrun():
        if device.type == "cuda":
            device = torch.device("cuda", _local_rank())
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), _local_rank(), owns_group=True)
    else:
        return DistContext(), device
    if device.type == "cuda" and device.index != ctx.local_rank:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    return ctx, device


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (bytes, in state-dict order)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(
            value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
