"""Momentum models and momentum distillation (ALBEF, BLIP).

- `momentum_copy` / `ema_update_`: a gradient-free copy of a module whose parameters follow
  the module's as an exponential moving average, θ_m ← m·θ_m + (1 − m)·θ (m = 0.995).
- `momentum_buffers` / `ema_update_buffers_`: the same, with the copy's weights held as
  buffers, so a model that owns it saves it with its checkpoints while no optimizer or
  trainable prefix can ever reach it (ALBEF's momentum model).
- `FeatureQueue`: a fixed-size ring buffer of the momentum model's past features (and, for
  BLIP, the ids of their images), the extra negatives of ALBEF's ITC. It is a module whose
  contents and pointer are buffers, so a checkpoint (or its own state_dict) resumes it
  exactly.
- `distillation_targets`: α·softmax(momentum logits) + (1 − α)·hard targets, the targets of
  ITC and MLM with momentum distillation; `alpha_ramp` raises α linearly from 0 over the
  first steps (ALBEF: the first epoch).

Shapes: K queue size, n rows enqueued at once, C target classes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.objectives.distributed import gather_sizes, gather_with_grad, world_size_and_rank


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters never take gradients; `ema_update_` moves it."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target ← momentum · target + (1 − momentum) · source, parameter by parameter."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    target_params = dict(target.named_parameters())
    source_params = dict(source.named_parameters())
    if target_params.keys() != source_params.keys():
        missing = sorted(source_params.keys() - target_params.keys())
        extra = sorted(target_params.keys() - source_params.keys())
        raise ValueError(f"momentum model does not mirror its source: missing {missing}, unexpected {extra}")
    for name, t in target_params.items():
        s = source_params[name]
        if t.shape != s.shape:
            raise ValueError(f"{name}: momentum shape {tuple(t.shape)} != source {tuple(s.shape)}")
        t.lerp_(s.to(t.dtype), 1.0 - momentum)


def momentum_buffers(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are turned into buffers of the same names.

    Held as a submodule of a model, the copy is saved in its state_dict (persistent buffers:
    checkpoints and an exact resume keep the momentum weights) and moves with `.to()`, yet it
    has no parameters at all: `named_parameters()`, `set_trainable` and optimizers never see
    it, so no stage can make it trainable. Tied parameters become one tensor under both names.
    `ema_update_buffers_` moves it.
    """
    twin = copy.deepcopy(module)
    tensors: dict[int, Tensor] = {}
    for sub in twin.modules():
        for name, param in list(sub.named_parameters(recurse=False, remove_duplicate=False)):
            tensor = tensors.setdefault(id(param), param.detach())
            delattr(sub, name)
            sub.register_buffer(name, tensor)
    return twin


@torch.no_grad()
def ema_update_buffers_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target buffer ← momentum · buffer + (1 − momentum) · source parameter of the same name,
    for a `momentum_buffers` copy of `source`; momentum 0 copies the source exactly.

    Every name of a tied parameter is covered once per distinct target tensor, so a tie that
    `.to()` split into two buffers still moves both, and a shared one moves once.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    buffers = dict(target.named_buffers(remove_duplicate=False))
    params = dict(source.named_parameters(remove_duplicate=False))
    missing = sorted(params.keys() - buffers.keys())
    if missing:
        raise ValueError(f"momentum model does not mirror its source: no buffers for {missing[:5]}")
    moved: set[int] = set()
    for name, s in params.items():
        t = buffers[name]
        if id(t) in moved:
            continue
        if t.shape != s.shape:
            raise ValueError(f"{name}: momentum shape {tuple(t.shape)} != source {tuple(s.shape)}")
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)
        moved.add(id(t))


class FeatureQueue(nn.Module):
    """Ring buffer of K rows per field; `enqueue` writes n rows at the pointer, wrapping. Under
    data parallelism it writes the rows of every rank.

    `widths` names the float feature fields (e.g. image=256, text=256) and their widths; `ids`
    names integer fields of one value per row (BLIP's image ids). Rows live in slot order;
    `get` returns the filled slots, which is the whole buffer once it has wrapped. Every field
    is written at the same slots, so row r of one field belongs with row r of the others.
    """

    def __init__(self, size: int, widths: Mapping[str, int], ids: Sequence[str] = ()) -> None:
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be positive, got {size}")
        names = [*widths, *ids]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"queue fields must be distinct and not empty, got {names}")
        reserved = {"ptr", "filled"} & set(names)
        if reserved:
            raise ValueError(f"queue field names {sorted(reserved)} are reserved")
        self.size = size
        self.fields = tuple(names)
        for name, width in widths.items():
            self.register_buffer(name, torch.zeros(size, width))
        for name in ids:
            self.register_buffer(name, torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, **rows: Tensor) -> None:
        """Write n rows of every field (detached) at the pointer; with n > K only the last K stay."""
        if set(rows) != set(self.fields):
            raise ValueError(f"enqueue needs exactly the fields {sorted(self.fields)}, got {sorted(rows)}")
        counts = {name: value.shape[0] for name, value in rows.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"every field must enqueue the same number of rows, got {counts}")
        n = next(iter(counts.values()))
        world, _ = world_size_and_rank()
        if world > 1:
            # Data parallel: every rank enqueues every rank's rows, in rank order (as ALBEF and
            # BLIP all-gather before enqueueing), so the queues stay identical.
            sizes = gather_sizes(n, self.ptr.device)
            rows = {name: gather_with_grad(value.detach().contiguous(), sizes=sizes) for name, value in rows.items()}
            n = sum(sizes)
        keep = min(n, self.size)
        start = int(self.ptr) + n - keep  # the dropped first n - keep rows would be overwritten anyway
        slots = (start + torch.arange(keep, device=self.ptr.device)) % self.size
        for name, value in rows.items():
            buffer: Tensor = getattr(self, name)
            buffer[slots] = value[n - keep :].detach().to(buffer.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def get(self, name: str) -> Tensor:
        """The filled rows of one field, in slot order: (filled, width) or (filled,)."""
        if name not in self.fields:
            raise KeyError(f"queue has no field {name!r}; fields: {list(self.fields)}")
        return getattr(self, name)[: int(self.filled)]


def distillation_targets(momentum_logits: Tensor, one_hot_labels: Tensor, alpha: float) -> Tensor:
    """α · softmax(momentum_logits) + (1 − α) · one_hot_labels, detached: (..., C).

    one_hot_labels may be any rows summing to 1 (BLIP spreads the ITC target over every
    positive of an image id).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if momentum_logits.shape != one_hot_labels.shape:
        raise ValueError(
            f"momentum logits {tuple(momentum_logits.shape)} and labels {tuple(one_hot_labels.shape)} differ"
        )
    soft = F.softmax(momentum_logits.detach().float(), dim=-1)
    return alpha * soft + (1.0 - alpha) * one_hot_labels.detach().float()


def alpha_ramp(step: int, ramp_steps: int, alpha: float) -> float:
    """alpha · min(1, step / ramp_steps): 0 at step 0, full from step ramp_steps on."""
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)
