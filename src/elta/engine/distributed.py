"""Several processes (GPUs, machines) training one model: ``torchrun --nproc-per-node N -m elta train``.

A distributed run keeps the recipe of a single-process one. ``--batch-size`` is the *global* batch: every
process draws the same seeded batches (:func:`elta.engine.trainer.epoch_batches`) and takes its contiguous
share of each (:meth:`Processes.share`). The main loss is normalised by the global weight sum and FLSA sees
the gathered global batch, so that the averaged gradient equals the single-process one; TFA mixes within
each process's share. Validation is split into contiguous shards and the predictions are gathered: every
sample is scored exactly once. Rank 0 writes every file of the run.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from elta import launch
from elta.errors import ConfigError, UnavailableError

__all__ = ["Processes", "SINGLE", "start_processes", "stop_processes"]

log = logging.getLogger(__name__)


class _GatherRows(torch.autograd.Function):
    """Concatenate each process's rows (uneven counts allowed) in rank order, with a gradient.

    Contract: every process computes the *same* function of the gathered rows (as FLSA does), so the
    gradient of the global loss with respect to this process's rows is the slice of the incoming gradient
    that belongs to them, counted once per process; DistributedDataParallel then averages over processes.
    Backward needs no communication.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, processes: Processes) -> torch.Tensor:
        counts = [row[0] for row in processes.all_counts([tensor.shape[0]], tensor.device)]
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(processes.world_size)]
        dist.all_gather(parts, padded)
        ctx.start = sum(counts[: processes.rank])
        ctx.count, ctx.world_size = tensor.shape[0], processes.world_size
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start : ctx.start + ctx.count] * ctx.world_size, None


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes; a single process by default."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes files and logs."""
        return self.rank == 0

    # --- splitting work ---------------------------------------------------------------------------------

    def share(self, items: Sequence) -> list:
        """This process's contiguous share of ``items``; shares differ in length by at most one."""
        items = list(items)
        start = self.rank * len(items) // self.world_size
        stop = (self.rank + 1) * len(items) // self.world_size
        return items[start:stop]

    # --- collectives (identity in a single process) -------------------------------------------------

    def all_counts(self, counts: Sequence[int], device: torch.device | str = "cpu") -> list[list[int]]:
        """Every process's ``counts`` (the same number of integers on each), in rank order."""
        if not self.distributed:
            return [[int(c) for c in counts]]
        table = torch.zeros(self.world_size, len(counts), dtype=torch.long, device=device)
        table[self.rank] = torch.tensor([int(c) for c in counts], dtype=torch.long)
        dist.all_reduce(table)
        return table.tolist()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise mean over processes of a (detached) tensor."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows [n_r, ...] of every process concatenated in rank order (see :class:`_GatherRows`)."""
        return _GatherRows.apply(tensor, self) if self.distributed else tensor

    def gather_objects(self, obj) -> list:
        """Every process's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers (e.g. BatchNorm running statistics)."""
        if not self.distributed:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # --- the model --------------------------------------------------------------------------------------

    def sync_batch_norm(self, model: nn.Module, device: torch.device) -> None:
        """Distributed runs on GPUs normalise over the global batch (SyncBatchNorm in the model's backbone
        and neck, in place); on CPUs each process normalises its share."""
        has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if not self.distributed or not has_batch_norm:
            return
        if device.type == "cuda":
            model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
            model.neck = nn.SyncBatchNorm.convert_sync_batchnorm(model.neck)
            log.info("BatchNorm layers synchronised across the %d processes", self.world_size)
        else:
            log.info(
                "BatchNorm on CPUs: each process normalises its share of the batch (SyncBatchNorm needs "
                "GPUs); rank 0's running statistics are given to all before validating and saving"
            )

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel (gradients averaged over processes), or as it is.

        Buffers are not broadcast every step: the trainer gives all processes rank 0's buffers before
        validating and before writing a checkpoint (:meth:`broadcast_buffers`).
        """
        if not self.distributed:
            return module
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # the same switch under its newer name (PyTorch ≥ 2.14); broadcast_buffers before
        newer = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
        return ddp(module, device_ids=device_ids, **no_buffer_sync)


SINGLE = Processes()


def start_processes(device_name: str) -> tuple[Processes, torch.device | None, bool]:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs).

    Returns (processes, device or None to resolve as usual, whether this call created the group and
    must destroy it). Outside torchrun: (SINGLE, None, False).
    """
    if not launch.launched_by_torchrun():
        return SINGLE, None, False
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"--device {device_name}: under torchrun each process takes its GPU from LOCAL_RANK; "
            "use --device auto, cuda or cpu"
        )
    if device_name == "cuda" and not use_cuda:
        raise UnavailableError(
            "--device cuda: CUDA is not available on this machine (use --device cpu or auto)"
        )
    device = torch.device("cuda", launch.local_rank()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    processes = Processes(rank=launch.rank(), world_size=launch.world_size())
    log.info("process %d of %d on %s (%s)", processes.rank, processes.world_size, device, dist.get_backend())
    return processes, device, created


def stop_processes() -> None:
    """Leave the process group (after :func:`start_processes` created it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
