"""Collectives for losses that compare every sample with the whole global batch (ITC, sigmoid),
and the few the data-parallel Trainer needs (gradient averaging, agreeing on a skipped batch,
logs averaged over ranks).

Each rank encodes its local slice of the global batch; the contrastive losses need the other
ranks' embeddings as well, and their gradients must come out as if one process had run the
whole batch. `gather_with_grad` concatenates every rank's block (in rank order) and keeps the
autograd graph through a custom Function whose backward SUMS the incoming gradients over ranks
(one all-reduce) and hands each rank the slice of its own block.

Why that design, and not "all_gather without gradient, then put the local block back": rank r's
loss L_r also depends on the blocks of the other ranks. After backward the trainer averages
parameter gradients over ranks (as DDP does), so the gradient that must reach block r is
sum_s dL_s/d(block r), and the parts with s != r only exist on the other ranks. With the
local block put back, rank r sees only dL_r/d(block r): the cross terms are lost when every
rank computes its local share of the loss, and when every rank computes the full global loss
instead, the averaged gradient comes out 1/world_size too small. Summing in backward gives
exactly the single-process gradient of mean_r L_r for either way of splitting the loss.

An all-reduce (rather than a reduce-scatter) returns the gradients because gloo, the CPU
backend, has no reduce-scatter; the tensors are (global batch, embedding width), small next to
the towers' activations. Ranks may hold different numbers of samples (a last batch, skipped
images): blocks are padded to the largest size for the all-gather and cut back afterwards.

Without an initialised process group (or with a world of one) every function here is the
identity, so single-process code can call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size_and_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(world size, this process's rank) in `group`; (1, 0) when not running distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_sizes(local_size: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's local batch size, in rank order. `device` is where the backend can
    communicate (CPU for gloo, this rank's GPU for NCCL)."""
    world, _ = world_size_and_rank(group)
    if world == 1:
        return [local_size]
    mine = torch.tensor([local_size], dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [int(size.item()) for size in everyone]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: Tensor, sizes: tuple[int, ...], rank: int, group: dist.ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded, group=group)
        return torch.cat([block[:size] for block, size in zip(blocks, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad_gathered: Tensor) -> tuple[Tensor, None, None, None]:
        # A copy: autograd may hand the same gradient buffer to other consumers.
        summed = grad_gathered.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return summed[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(
    local: Tensor, group: dist.ProcessGroup | None = None, sizes: Sequence[int] | None = None
) -> Tensor:
    """All ranks' blocks of `local` (n_r, ...) concatenated along dim 0 in rank order,
    differentiable with respect to this rank's block (see the module docstring for how the
    gradient is summed over ranks).

    `sizes` (every rank's n_r, from `gather_sizes`) saves one collective when the caller
    already knows them. Returns `local` itself when not running distributed.
    """
    world, rank = world_size_and_rank(group)
    if world == 1:
        return local
    if sizes is None:
        sizes = gather_sizes(local.shape[0], local.device, group)
    if len(sizes) != world or sizes[rank] != local.shape[0]:
        raise ValueError(
            f"sizes {list(sizes)} do not fit rank {rank} of {world} holding {local.shape[0]} rows"
        )
    return _GatherWithGrad.apply(local.contiguous(), tuple(sizes), rank, group)


def average_gradients(params: Sequence[nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Replace each parameter's gradient by its mean over ranks (what DDP does), in ONE
    all-reduce over a flat buffer. A parameter no loss reached on this rank counts as zero; one
    no loss reached on ANY rank keeps no gradient, as in a single process (AdamW skips it)."""
    world, _ = world_size_and_rank(group)
    if world == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    reached = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [reached])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= world
    offset = 0
    reached_anywhere = (flat[-len(params):] > 0).tolist()
    for p, anywhere in zip(params, reached_anywhere, strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype, copy=True) if anywhere else None
        offset += n


def all_ranks(flag: bool, device: torch.device, group: dist.ProcessGroup | None = None) -> bool:
    """True when `flag` is true on every rank (e.g. every rank has a usable batch)."""
    world, _ = world_size_and_rank(group)
    if world == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.long, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def mean_over_ranks(value: float, device: torch.device, group: dist.ProcessGroup | None = None) -> float:
    """`value` averaged over ranks (e.g. the loss of the global batch)."""
    world, _ = world_size_and_rank(group)
    if world == 1:
        return value
    packed = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return float(packed.item()) / world
