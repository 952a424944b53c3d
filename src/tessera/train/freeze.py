"""Trainability as data: one function freezes everything a stage does not train.

A frozen parameter has requires_grad False; a module none of whose parameters train is put
in eval mode (dropout off) and kept there by `apply_train_mode` whenever training resumes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def _matches(name: str, prefixes: list[str]) -> bool:
    return any(p == "*" or name == p or name.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    frozen: int
    trainable_modules: tuple[str, ...]
    frozen_modules: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"trainable {self.trainable:,} params ({', '.join(self.trainable_modules) or '-'}); "
            f"frozen {self.frozen:,} params ({', '.join(self.frozen_modules) or '-'})"
        )


def set_trainable(model: nn.Module, prefixes: list[str]) -> TrainableReport:
    """Freeze every parameter whose name matches none of `prefixes`; returns the counts."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if p != "*" and not any(_matches(n, [p]) for n in names)]
    if unknown:
        tops = sorted({n.split(".")[0] for n in names})
        raise ValueError(f"trainable prefixes {unknown} match no parameter; top-level modules are {tops}")
    trainable = frozen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(_matches(name, prefixes))
        if param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    top_train = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
    top_frozen = sorted({n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad})
    apply_train_mode(model)
    return TrainableReport(trainable, frozen, tuple(top_train), tuple(top_frozen))


def apply_train_mode(model: nn.Module) -> None:
    """model.train(), then eval mode for every module with parameters none of which train."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
