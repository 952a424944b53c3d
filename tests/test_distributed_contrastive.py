"""The contrastive losses across processes equal the single-process losses over the global batch.

Each rank (gloo on 127.0.0.1, spawned with torch.multiprocessing) encodes its slice of one
global batch with tiny linear towers built from the same seed, computes its share of the loss
with `distributed=True`, backpropagates, and averages the parameter gradients over ranks as
DDP does. The mean loss and the averaged gradients must equal those of one process running the
whole batch. A naive gather (all_gather without gradient, local block put back) runs beside
it as a control: its gradients must differ, which shows the comparison can fail.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from tessera.objectives.contrastive import clip_loss, siglip_loss

IMAGE_DIM, TEXT_DIM, EMBED_DIM = 6, 5, 4
TOLERANCE = 1e-9  # float64 throughout: only summation order differs between the two runs
LOSSES = ("clip", "clip_hard_negatives", "siglip", "siglip_hard_negatives")


class TinyDualEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_tower = nn.Linear(IMAGE_DIM, EMBED_DIM, dtype=torch.float64)
        self.text_tower = nn.Linear(TEXT_DIM, EMBED_DIM, dtype=torch.float64)
        self.clip_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        self.siglip_scale = nn.Parameter(torch.tensor([math.log(10.0)], dtype=torch.float64))
        self.siglip_bias = nn.Parameter(torch.tensor([-10.0], dtype=torch.float64))

    def loss(self, name: str, images: Tensor, texts: Tensor, distributed: bool, first: int = 0) -> Tensor:
        """`first`: global index of this slice's first pair (it decides which pairs have a hard
        negative, so the ranks hold different numbers of them)."""
        image_emb = F.normalize(self.image_tower(images), dim=-1)
        text_emb = F.normalize(self.text_tower(texts), dim=-1)
        if name == "clip":
            return clip_loss(image_emb, text_emb, self.clip_scale, distributed=distributed)
        if name == "clip_hard_negatives":
            negatives = _hard_negative_inputs(texts, first)
            negative_emb = F.normalize(self.text_tower(negatives), dim=-1)
            return clip_loss(image_emb, text_emb, self.clip_scale, hard_negative_texts=negative_emb,
                             distributed=distributed)
        if name == "siglip_hard_negatives":
            negative_emb = F.normalize(self.text_tower(_hard_negative_inputs(texts, first)), dim=-1)
            return siglip_loss(image_emb, text_emb, self.siglip_scale, self.siglip_bias,
                               hard_negative_texts=negative_emb, distributed=distributed)
        return siglip_loss(image_emb, text_emb, self.siglip_scale, self.siglip_bias, distributed=distributed)


def _global_batch(size: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(size, IMAGE_DIM, generator=g, dtype=torch.float64),
            torch.randn(size, TEXT_DIM, generator=g, dtype=torch.float64))


def _hard_negative_inputs(texts: Tensor, first: int) -> Tensor:
    """A perturbed copy of the texts whose global index is not 1 mod 3 (some ranks get none)."""
    keep = [i for i in range(texts.shape[0]) if (first + i) % 3 != 1]
    return texts[keep].flip(-1) + 0.1


def _gradients(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _naive_clip_loss(model: TinyDualEncoder, images: Tensor, texts: Tensor, sizes: list[int]) -> Tensor:
    """The bug the design avoids: other ranks' features gathered WITHOUT gradient, the local
    block put back, each rank computing its local share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    image_emb = F.normalize(model.image_tower(images), dim=-1)
    text_emb = F.normalize(model.text_tower(texts), dim=-1)
    largest = max(sizes)
    gathered = []
    for local in (image_emb, text_emb):
        padded = local.new_zeros((largest, EMBED_DIM))
        padded[: local.shape[0]] = local.detach()
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded)
        blocks = [b[:n] for b, n in zip(blocks, sizes, strict=True)]
        blocks[rank] = local
        gathered.append(torch.cat(blocks))
    all_images, all_texts = gathered
    start = sum(sizes[:rank])
    labels = torch.arange(start, start + image_emb.shape[0])
    scale = model.clip_scale.exp()
    summed = (F.cross_entropy(scale * image_emb @ all_texts.t(), labels, reduction="sum")
              + F.cross_entropy(scale * text_emb @ all_images.t(), labels, reduction="sum"))
    return 0.5 * summed * world / sum(sizes)


def _averaged_over_ranks(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    world = dist.get_world_size()
    for t in tensors.values():
        dist.all_reduce(t)
        t /= world
    return tensors


def _worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        model = TinyDualEncoder()
        images, texts = _global_batch(sum(sizes))
        start = sum(sizes[:rank])
        local_images, local_texts = images[start : start + sizes[rank]], texts[start : start + sizes[rank]]
        result: dict[str, object] = {}
        for name in LOSSES:
            model.zero_grad(set_to_none=True)
            loss = model.loss(name, local_images, local_texts, distributed=True, first=start)
            loss.backward()
            result[f"{name}_local_loss"] = float(loss.detach())
            result[f"{name}_mean_loss"] = float(_averaged_over_ranks({"loss": loss.detach().clone()})["loss"])
            result[f"{name}_grads"] = _averaged_over_ranks(_gradients(model))
        model.zero_grad(set_to_none=True)
        _naive_clip_loss(model, local_images, local_texts, sizes).backward()
        result["naive_clip_grads"] = _averaged_over_ranks(_gradients(model))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [[3, 3], [2, 4, 1], [1, 3]], ids=["2 ranks, equal", "3 ranks, unequal", "2 ranks, one without hard negatives"])
def test_distributed_losses_and_gradients_equal_single_process(sizes: list[int], tmp_path: Path,
                                                                free_port: int) -> None:
    world = len(sizes)
    mp.spawn(_worker, args=(world, free_port, sizes, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    model = TinyDualEncoder()
    images, texts = _global_batch(sum(sizes))
    for name in LOSSES:
        model.zero_grad(set_to_none=True)
        reference = model.loss(name, images, texts, distributed=False)
        reference.backward()
        reference_grads = _gradients(model)
        local_losses = [r[f"{name}_local_loss"] for r in ranks]
        # The shares differ from rank to rank; only their mean is the global loss.
        assert max(local_losses) - min(local_losses) > 1e-3
        for r in ranks:
            assert abs(r[f"{name}_mean_loss"] - float(reference.detach())) <= TOLERANCE
            assert set(r[f"{name}_grads"]) == set(reference_grads)
            for param, grad in reference_grads.items():
                assert torch.allclose(r[f"{name}_grads"][param], grad, rtol=0, atol=TOLERANCE), (name, param)
        if name == "clip":
            naive_gap = max(float((ranks[0]["naive_clip_grads"][p] - g).abs().max())
                            for p, g in reference_grads.items() if p.endswith("tower.weight"))
            assert naive_gap > 1e-3
