"""Distributed set-up for the train command: the process group, the device, and the DDP / FSDP2 wrap."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .model import StableGPT


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t = t / self.world
        return t

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def setup(device: str, fsdp: bool) -> Dist:
    """The process group under torchrun (gloo on CPU, NCCL on CUDA); one process otherwise."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not launched:
        if fsdp:
            raise ValueError("fsdp: FSDP2 needs a process group; launch with torchrun --nproc_per_node N -m stableblocks.train --fsdp")
        return Dist(device=torch.device("cuda" if cuda else "cpu") if device == "auto" else torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu") if device in ("auto", "cuda") else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


def wrap(model: StableGPT, d: Dist, fsdp: bool, compile: bool):
    """(what training calls, the module diagnostics and checkpoints read)."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for block in model.blocks:
            if compile:
                block.compile()  # torchtitan's order: compile, then shard
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    if compile:
        model.compile()
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None), model
    return model, model


def reshard(core) -> None:
    """After a no-grad forward under FSDP2: the root keeps its gathered weights after forward
    (for the backward that never comes) and the next forward would reuse them after the
    optimizer has changed the shards. Drop them."""
    from torch.distributed.fsdp import FSDPModule

    for m in core.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def grad_sync(net, core, fsdp: bool, sync: bool):
    """Gradient all-reduce only on the last micro-step of an accumulation."""
    if fsdp:
        core.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


def any_true(flag: bool, d: Dist) -> bool:
    """True on every process when `flag` is true on any (so all of them stop together)."""
    if d.world == 1:
        return flag
    t = torch.tensor(float(flag), device=d.device)
    dist.all_reduce(t)
    return bool(t.item())
