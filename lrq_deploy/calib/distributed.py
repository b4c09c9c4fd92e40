"""Data-parallel calibration on torch.distributed (launched by torchrun; gloo on CPU, NCCL on GPUs).

Every rank runs the same block-wise loop on its share of the calibration samples (global sample
g lives on rank g % world). What the methods reduce over samples is reduced across ranks:
activation statistics (max / min), the loss terms that drive dynamic weighting, the gradients
of the learnable parameters (summed, each rank's terms scaled by its share of the batch, so the
sum is the single-process batch mean), and the reported block errors. Ranks therefore hold
identical parameters at every step, and the checkpoint equals a single process's on the same
samples up to the order of float sums. Rank 0 writes the run directory and the checkpoint.
A rank that stops ends the others with one line (the collective fails instead of hanging).
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import torch

from lrq_deploy.errors import LrqError

TIMEOUT = timedelta(minutes=30)  # a peer that hangs (rather than dies) ends the job after this


class Collective:
    """One process: every reduction is the identity."""

    rank = 0
    world = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def own_device(self, device: torch.device) -> torch.device:
        """The device this rank calibrates on (a rank of a multi-GPU job has its own GPU)."""
        return device

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        return samples[self.rank::self.world] if self.world > 1 else samples

    def local_positions(self, batch: torch.Tensor) -> torch.Tensor:
        """Global sample indices of a batch -> positions of this rank's samples in its shard."""
        if self.world == 1:
            return batch
        mine = batch[batch % self.world == self.rank]
        return (mine - self.rank) // self.world

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sum_grads(self, params) -> None:
        pass

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchDistributed(Collective):
    """The ranks of a torchrun job (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise LrqError("--distributed runs under torchrun, e.g. torchrun --nproc-per-node 2 $(which lrq) "
                           "calibrate MODEL -o OUT --distributed")
        self.dist = dist
        if device.type == "cuda":  # one GPU per rank of this machine
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device

    def own_device(self, device: torch.device) -> torch.device:
        return self.device

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        out = tensor.detach().to(self.device, copy=True)  # NCCL reduces device tensors, gloo host ones
        try:
            self.dist.all_reduce(out, op=op)
        except Exception as exc:  # gloo / NCCL raise their own types when a peer is gone
            detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)  # gloo prefixes its source location
            raise LrqError(f"rank {self.rank}: another calibration rank stopped ({detail[:120]}); the job ends") from None
        return out.to(tensor.device)

    def sum(self, tensor):
        return self._reduce(tensor, self.dist.ReduceOp.SUM)

    def max(self, tensor):
        return self._reduce(tensor, self.dist.ReduceOp.MAX)

    def min(self, tensor):
        return self._reduce(tensor, self.dist.ReduceOp.MIN)

    def sum_grads(self, params) -> None:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.copy_(self.sum(param.grad))

    def barrier(self) -> None:
        self.sum(torch.zeros(1, device=self.device))

    def close(self) -> None:
        """Leave together: a rank that tears its connections down while a peer is still inside
        the last reduction makes that peer's transport abort."""
        if self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()


SINGLE = Collective()
