"""Zero-shot image classification with a dual encoder, as CLIP does it.

Each class name is written into every prompt template ("a photo of a {}."); the template
embeddings are normalised, averaged and renormalised into one classifier row; the logits are
scale · image · classᵀ with CLIP's scale of 100.

The module is tokenizer-agnostic: the caller passes `encode_text(list[str]) -> (n, P)`. A class
name that would reach the encoder as nothing (empty or whitespace only) is refused with the
class named; pass `tokenize(str) -> token ids` to also refuse names that tokenise to no
tokens (e.g. characters the vocabulary drops).

Shapes: C classes, T templates, N images, P embedding width.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CLASS_NAME_SLOT = "{}"

# CLIP's logit scale at the end of training, exp(ln 100): its zero-shot logits use it as is.
CLIP_ZEROSHOT_SCALE = 100.0


def _check_class_names(class_names: Sequence[str], tokenize: Callable[[str], Sequence[int]] | None) -> None:
    if len(class_names) == 0:
        raise ValueError("zero-shot classification needs at least one class name")
    for index, name in enumerate(class_names):
        if not name.strip():
            raise ValueError(f"class {index} has an empty name {name!r}")
        if tokenize is not None and len(tokenize(name)) == 0:
            raise ValueError(f"class {index} name {name!r} tokenises to nothing")
    repeated = sorted(name for name, count in Counter(class_names).items() if count > 1)
    if repeated:
        raise ValueError(f"class names appear more than once, so their classes cannot be told apart: {repeated}")


@torch.no_grad()
def build_zeroshot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    tokenize: Callable[[str], Sequence[int]] | None = None,
) -> Tensor:
    """(C, P) unit-norm class embeddings: for each class, the mean of its T normalised template
    embeddings, renormalised. The name replaces every "{}" of a template; a template without
    "{}" would give every class the same prompt and is refused, as are empty, repeated or
    (with `tokenize`) untokenisable class names. encode_text is called once per class."""
    if len(templates) == 0:
        raise ValueError("zero-shot classification needs at least one prompt template")
    without_slot = [t for t in templates if CLASS_NAME_SLOT not in t]
    if without_slot:
        raise ValueError(f"templates without a '{CLASS_NAME_SLOT}' slot for the class name: {without_slot}")
    _check_class_names(class_names, tokenize)
    rows = []
    for index, name in enumerate(class_names):
        embeddings = encode_text([t.replace(CLASS_NAME_SLOT, name) for t in templates])
        if embeddings.ndim != 2 or embeddings.shape[0] != len(templates):
            raise ValueError(f"encode_text returned shape {tuple(embeddings.shape)} for {len(templates)} prompts")
        mean = F.normalize(embeddings.float(), dim=-1).mean(dim=0)
        if float(mean.norm()) < 1e-6:
            raise ValueError(f"class {index} {name!r}: its template embeddings cancel out (mean of norm ~0)")
        rows.append(F.normalize(mean, dim=0))
    return torch.stack(rows)


def zeroshot_logits(image_emb: Tensor, classifier: Tensor, scale: float = CLIP_ZEROSHOT_SCALE) -> Tensor:
    """(N, C) logits scale · normalise(image_emb) · classifierᵀ."""
    if image_emb.ndim != 2 or classifier.ndim != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"image embeddings {tuple(image_emb.shape)} and classifier {tuple(classifier.shape)} "
            "must be (N, P) and (C, P)"
        )
    return scale * F.normalize(image_emb.float(), dim=-1) @ classifier.float().t()


def topk_accuracy(logits: Tensor, labels: Tensor | Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose true class is among the k highest logits, per k.

    Ties count against the prediction: a wrong class with a logit EQUAL to the true one ranks
    ahead of it. k at least the number of classes gives 1.0.
    """
    labels = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be (N, C) and (N,)")
    if logits.shape[0] == 0:
        raise ValueError("top-k accuracy over no examples")
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {list(ks)}")
    true_logit = logits.gather(1, labels[:, None])
    is_true = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    ranks = ((logits >= true_logit) & ~is_true).sum(dim=1)
    return {k: float((ranks < k).float().mean()) for k in ks}
