"""The same trainer on several GPUs: one process per GPU under torch.distributed (NCCL; gloo
on CPU), adapter gradients averaged every step, rank 0 validates and publishes."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch


def all_reduce_grads(params: List[torch.nn.Parameter], world_size: int) -> None:
    """Average adapter gradients over ranks (every rank calls this once per step, in the same
    parameter order, even when its batch had nothing to learn from)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size


def _worker(rank: int, world_size: int, backend: str, kwargs: Dict) -> None:
    import torch.distributed as dist

    from .loop import AdapterTrainer

    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        device = f"cuda:{rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        AdapterTrainer(**kwargs, device=device, rank=rank, world_size=world_size).run()
    finally:
        dist.destroy_process_group()


def train_distributed(world_size: int, backend: Optional[str] = None, **kwargs) -> None:
    """Run the trainer in `world_size` processes. MONAI Label sets MASTER_ADDR/MASTER_PORT for
    its training subprocess; the defaults cover a standalone run."""
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs.pop("log", None)  # not picklable in general; ranks log through print
    mp.spawn(_worker, args=(world_size, backend, {**kwargs, "log": print}), nprocs=world_size, join=True)
