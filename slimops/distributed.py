"""Data-parallel calibration on torch.distributed (torchrun), not a home-made process pool.

Under `torchrun --nproc_per_node N` every rank loads the model and draws the same calibration
windows (same seed), then calibrates on its own contiguous share of them (`shard`). Whatever a
method accumulates over calibration tokens is summed over ranks before it is used: Hessians
(sequential.LayerWork.hessians), input statistics (methods.common.InputStats), gradients
(taylor), error curves' energies and search's fitness. Every rank then holds the same numbers
and makes the same decision; rank 0 alone writes the checkpoint and prints.

Multi-node is the same program: `torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d
--rdzv_endpoint HOST:PORT -m slimops.cli prune ...` (docs/cli.md). One process is world size 1,
and nothing here does anything.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def backend() -> str:
    """The process-group backend: gloo for CPU tensors, plus nccl for CUDA ones with GPUs.
    NCCL alone rejects CPU tensors, and the scalars methods sum (token counts, losses, search
    fitness) are CPU tensors, so `nccl` by itself stopped every multi-GPU run at its first
    collective; `cpu:gloo,cuda:nccl` routes each tensor to the backend of its device."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1, or any
    torchrun launch, so that a 1-rank torchrun on a GPU runs its collectives on NCCL too).
    True when this process is part of a group."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not launched:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend())
        atexit.register(_leave)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def _leave() -> None:
    """Destroy the group before the interpreter shuts down: a gloo group still alive at exit
    aborted its process ("terminate called without an active exception", SIGABRT) in about
    half of the 2-rank runs here, so a finished torchrun reported a failure."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_devices() -> set[str]:
    """Device types the process group's backends take ("cpu", "cuda"); empty outside one."""
    if not (dist.is_available() and dist.is_initialized()):
        return set()
    return {part.split(":")[0] for part in str(dist.get_backend_config()).split(",")}


def _checked(t: torch.Tensor) -> torch.Tensor:
    """Every collective goes through here: a tensor on a device the group's backends reject
    fails now, with its device named, instead of deep inside NCCL or gloo."""
    devices = collective_devices()
    if t.device.type not in devices:
        raise ValueError(
            f"slimops: a collective got a {t.device.type} tensor, but the process group "
            f"({dist.get_backend_config()}) takes only {', '.join(sorted(devices))} tensors"
        )
    return t


def shard_bounds(n: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n samples."""
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size


def shard(tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
    """This rank's contiguous share of the calibration windows and a line saying so."""
    rank, size = world()
    n = tokens.shape[0]
    if size == 1:
        return tokens, f"calibrating on samples 0-{n - 1}"
    if n < size:
        raise ValueError(f"{n} calibration samples cannot be split over {size} ranks")
    start, end = shard_bounds(n)
    line = f"world size {size}: rank {rank} calibrates on samples {start}-{end - 1}"
    return tokens[start:end], line


def global_count(local: torch.Tensor) -> int:
    """How many samples all ranks' shards (`shard`) hold together."""
    return round(all_sum_float(local.shape[0]))


def local_rows(local: torch.Tensor, indices, total: int) -> torch.Tensor:
    """This rank's rows among the samples with these GLOBAL indices (sorted), from its shard;
    total = global_count(local). A subset every rank chooses the same way (a seeded draw over
    the global count, the first n) then gives the same sums over ranks as one process with
    all the samples; a rank may hold none of them (a 0-row tensor)."""
    start, end = shard_bounds(total)
    return local[[i - start for i in indices if start <= i < end]]


def first_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """This rank's share of the first n samples over all ranks (tokens[:n] of one process)."""
    total = global_count(local)
    return local_rows(local, range(min(n, total)), total)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place. Inside a group the collective runs at every world size
    (a 1-rank GPU run still exercises NCCL), on a device its backends take (checked)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(_checked(t), op=dist.ReduceOp.SUM)
    return t


def all_sum_float(x: float) -> float:
    """Sum a Python number over ranks (through a CPU tensor: the gloo side of the group)."""
    return float(all_sum(torch.tensor([x], dtype=torch.float64))[0]) if world()[1] > 1 else x


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in rank order ([t] alone)."""
    if world()[1] == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(world()[1])]
    dist.all_gather(out, _checked(t.contiguous()))
    return out


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
