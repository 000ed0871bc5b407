"""Running under `torchrun`: joining the process group, and who does what on which rank.

Shared by the stages that scale out (the importance pass of `minitron prune`, the training loop of
`minitron distill` / `minitron finetune`). Without torchrun everything here is a single rank 0.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from toolchain.data import prepare_data
from toolchain.models import resolve_device
from toolchain.settings import DataConfig


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world_size).tolist()))


@contextlib.contextmanager
def distributed_context(device: str):
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); leave it at the end."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch_device = resolve_device(device)
    if world_size == 1:
        yield Distributed(0, 1, torch_device)
        return
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    try:
        yield Distributed(dist.get_rank(), dist.get_world_size(), torch_device)
    finally:
        if created:
            dist.destroy_process_group()


def prepare_data_on_ranks(data: DataConfig, tokenizer, runtime: Distributed):
    """Rank 0 tokenizes and caches the data first, so ranks never write the same cache entry at once."""
    if not runtime.is_main:
        runtime.barrier()
    packed = prepare_data(data, tokenizer)
    if runtime.is_main:
        runtime.barrier()
    return packed
