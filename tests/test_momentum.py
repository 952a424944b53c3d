"""Momentum model update, the feature queue (wrap-around, slot order, exact resume), momentum
distillation targets and the α ramp."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tessera.objectives.momentum import (
    FeatureQueue,
    alpha_ramp,
    distillation_targets,
    ema_update_,
    momentum_copy,
)


def test_ema_update_by_hand() -> None:
    source = nn.Linear(2, 2)
    with torch.no_grad():
        source.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        source.bias.copy_(torch.tensor([10.0, -10.0]))
    target = momentum_copy(source)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        source.weight.add_(1.0)
        source.bias.zero_()
    ema_update_(target, source, momentum=0.9)
    # 0.9 · old + 0.1 · new
    assert torch.allclose(target.weight, torch.tensor([[1.1, 2.1], [3.1, 4.1]]))
    assert torch.allclose(target.bias, torch.tensor([9.0, -9.0]))
    assert torch.equal(source.weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))  # the source is untouched
    ema_update_(target, source, momentum=0.9)
    assert torch.allclose(target.bias, torch.tensor([8.1, -8.1]))
    ema_update_(target, source, momentum=0.0)
    assert torch.equal(target.weight, source.weight)


def test_momentum_copy_keeps_ties_and_owns_its_storage() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    twin = momentum_copy(model)
    assert twin.head.weight is twin.embed.weight
    assert twin.embed.weight.data_ptr() != model.embed.weight.data_ptr()
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    ema_update_(twin, model, 0.5)
    assert torch.allclose(twin.embed.weight, model.embed.weight - 0.5)


def test_ema_refuses_a_model_that_does_not_mirror_the_source() -> None:
    with pytest.raises(ValueError, match="does not mirror"):
        ema_update_(nn.Linear(2, 2, bias=False), nn.Linear(2, 2), 0.995)
    with pytest.raises(ValueError, match="shape"):
        ema_update_(nn.Linear(2, 3), nn.Linear(2, 2), 0.995)


def rows(start: int, n: int, width: int = 2) -> torch.Tensor:
    """Rows whose every entry is their running number: row k is [k, k, ...]."""
    return torch.arange(start, start + n, dtype=torch.float)[:, None].expand(n, width).clone()


def test_queue_wraps_around_in_slot_order() -> None:
    queue = FeatureQueue(5, {"image": 2, "text": 2}, ids=["idx"])
    assert len(queue) == 0 and queue.get("image").shape == (0, 2)
    queue.enqueue(image=rows(0, 2), text=-rows(0, 2), idx=torch.tensor([0, 1]))
    queue.enqueue(image=rows(2, 2), text=-rows(2, 2), idx=torch.tensor([2, 3]))
    assert len(queue) == 4 and int(queue.ptr) == 4
    assert queue.get("image")[:, 0].tolist() == [0, 1, 2, 3]
    queue.enqueue(image=rows(4, 3), text=-rows(4, 3), idx=torch.tensor([4, 5, 6]))
    # Slot 4 takes row 4, then the pointer wraps: rows 5 and 6 overwrite the oldest, 0 and 1.
    assert len(queue) == 5 and int(queue.ptr) == 2
    assert queue.get("image")[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert queue.get("text")[:, 1].tolist() == [-5, -6, -2, -3, -4]
    assert queue.get("idx").tolist() == [5, 6, 2, 3, 4]
    # More rows than slots: only the newest five stay, each where its turn would have put it.
    queue.enqueue(image=rows(7, 7), text=-rows(7, 7), idx=torch.arange(7, 14))
    assert int(queue.ptr) == (2 + 7) % 5
    assert queue.get("image")[:, 0].tolist() == [10, 11, 12, 13, 9]
    assert queue.get("idx").tolist() == [10, 11, 12, 13, 9]


def test_queue_resumes_exactly_from_its_state_dict() -> None:
    queue = FeatureQueue(4, {"feat": 3})
    queue.enqueue(feat=rows(0, 3, width=3))
    resumed = FeatureQueue(4, {"feat": 3})
    resumed.load_state_dict(queue.state_dict())
    assert set(queue.state_dict()) == {"feat", "ptr", "filled"}
    for q in (queue, resumed):
        q.enqueue(feat=rows(3, 2, width=3))
    assert torch.equal(queue.get("feat"), resumed.get("feat"))
    assert int(resumed.ptr) == 1 and len(resumed) == 4


def test_queue_stores_detached_rows_and_checks_fields() -> None:
    queue = FeatureQueue(3, {"feat": 2})
    grad_rows = torch.ones(2, 2, requires_grad=True)
    queue.enqueue(feat=grad_rows * 2)
    assert not queue.get("feat").requires_grad
    with pytest.raises(ValueError, match="exactly the fields"):
        queue.enqueue(other=torch.ones(1, 2))
    two = FeatureQueue(3, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="same number of rows"):
        two.enqueue(a=torch.ones(1, 2), b=torch.ones(2, 2))
    with pytest.raises(ValueError, match="reserved"):
        FeatureQueue(3, {"ptr": 2})
    with pytest.raises(KeyError, match="no field"):
        queue.get("text")


def test_distillation_targets_mix_soft_and_hard() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]], requires_grad=True)
    hard = torch.eye(4)[[1, 0]]
    targets = distillation_targets(logits, hard, alpha=0.4)
    assert torch.allclose(targets[0], torch.tensor([0.1, 0.7, 0.1, 0.1]))
    soft = torch.softmax(logits.detach()[1], 0)
    assert torch.allclose(targets[1], 0.4 * soft + 0.6 * torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(targets.sum(-1), torch.ones(2))
    assert not targets.requires_grad
    assert torch.equal(distillation_targets(logits, hard, alpha=0.0), hard)
    with pytest.raises(ValueError, match="alpha"):
        distillation_targets(logits, hard, alpha=1.5)


def test_alpha_ramp() -> None:
    assert alpha_ramp(0, 100, 0.4) == 0.0
    assert alpha_ramp(25, 100, 0.4) == pytest.approx(0.1)
    assert alpha_ramp(100, 100, 0.4) == pytest.approx(0.4)
    assert alpha_ramp(1000, 100, 0.4) == pytest.approx(0.4)
    assert alpha_ramp(0, 0, 0.4) == pytest.approx(0.4)


def _queue_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        queue = FeatureQueue(5, {"image": 2}, ids=["image_id"])
        for step in range(2):  # rank 0 enqueues 2 rows a step, rank 1 one row: 3 a step, wrapping at 5
            n = 2 - rank
            queue.enqueue(image=torch.full((n, 2), 10.0 * step + rank), image_id=torch.arange(n) + 100 * rank)
        torch.save(queue.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_queue_under_data_parallelism_enqueues_every_ranks_rows(tmp_path: Path, free_port: int) -> None:
    mp.spawn(_queue_worker, args=(free_port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = FeatureQueue(5, {"image": 2}, ids=["image_id"])
    for step in range(2):  # what one process sees: rank 0's rows, then rank 1's
        single.enqueue(image=torch.tensor([[10.0 * step] * 2, [10.0 * step] * 2, [10.0 * step + 1] * 2]),
                       image_id=torch.tensor([0, 1, 100]))
    for state in states:
        for name, value in single.state_dict().items():
            assert torch.equal(state[name], value), name
