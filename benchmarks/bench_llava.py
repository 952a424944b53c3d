"""Tessera vs Hugging Face transformers on a tiny LLaVA-1.5, same weights, same machine, one run.

Both sides hold the same model (the `llava-1.5-tiny` preset dimensions: CLIP-style ViT 64 px /
patch 8 / width 128 / 4 layers, two-layer GELU MLP connector, LLaMA width 256 / 4 layers /
4 query heads / 2 key-value heads / intermediate 704, vocabulary of a BPE tokenizer trained
on the data), with the weights copied from the transformers `LlavaForConditionalGeneration`
into the Tessera `LVLM` through `tessera.interop.hf_keys`. Logits, losses and greedy
generations are checked equal before anything is timed. Everything runs in float32 unless
a row says bf16 (CPU autocast, both sides alike).

Measured, each as the median of several repetitions after warm-up, the two libraries
interleaved repetition by repetition so that machine noise hits both alike:

1. train step, mixed lengths: forward, backward and AdamW step of LLaVA stage 2 (ViT frozen,
   connector and LLM trained) over 16 real ShapesWorld conversations grouped by image.
   transformers right-pads to the longest and computes its own loss from labels with -100;
   Tessera packs the samples into one row (`pack_collate`, cu_seqlens) and uses
   `next_token_loss`, passing the decoder the positions the loss reads (`keep`) so that its
   last layer computes queries, attention output and MLP only there. An ablation times Tessera
   without `keep` in the same loop. tokens/s counts real tokens only.
2. train step, dense: the same step over 16 sequences cropped to one length (no padding on
   either side; Tessera gets a plain (B, L) batch, transformers no attention mask).
3. generation: greedy, 8 prompts with one image each, left-padded, 32 new tokens with a KV
   cache. transformers `generate(do_sample=False, min_new_tokens=max_new_tokens)`; Tessera
   `tessera.infer.generate.generate` with a stop id that never occurs, so both produce
   exactly 8 × 32 tokens.
4. model FLOPs utilisation of Tessera's training step against the fp32 matmul peak of this
   machine, measured in the same run (best of several large square matmuls).

Model FLOPs of one training step: the useful work only (norms, activations, RoPE, softmax and
the optimizer are not counted), the same F charged to both libraries:

    F = F_vit + F_connector + F_llm + F_attn + F_head

    F_vit       = 2 · N_img · [K · (S_v · P_vit_layer + 2 · S_v² · E_v) + P_v · P_patch]
                  forward only: the ViT is frozen and no gradient flows into it. K = 3 layers
                  run to reach the feature layer (-2 of 4), S_v = 65 tokens per image, P_v = 64
                  patches, P_vit_layer the matmul parameters of one ViT layer, P_patch = 3·8·8·E_v.
    F_connector = 6 · T_v · P_connector               T_v = 64 · N_img projected image tokens
    F_llm       = 6 · [T · (N_l − 1) · P_layer + T · P_kv + M · (P_layer − P_kv)]
                  T real (unpadded) tokens, N_l = 4 decoder layers of P_layer matmul parameters;
                  the last layer's keys and values (P_kv) are needed at every position, its
                  queries, output projection and MLP only at the M supervised positions, the
                  only ones the loss reads.
    F_attn      = 3 · 4 · E_q · [(N_l − 1) · Σ_s L_s(L_s + 1)/2 + Σ_m (p_m + 1)]
                  causal QKᵀ and AV (2 · 2 · E_q per query-key pair, ×3 for forward and
                  backward) over each sample s of L_s tokens; in the last layer only the M
                  supervised queries, at positions p_m of their samples. E_q = heads · head dim.
    F_head      = 6 · M · E · V                       logits where a target exists

mfu = F / t_step / peak, with peak the fp32 matmul rate measured in the same run (not a
datasheet figure). transformers is charged the same F, so its MFU counts what it does beyond
(padding, the last layer and the logits at every position, the ViT's last layer) as waste.
`mfu_nominal` uses the common 6·P·T convention instead (every layer at every position, full
causal attention in every layer), which credits Tessera with work it skips; it is reported
for comparison with figures quoted that way.

Run: `make bench` (= `.venv/bin/python benchmarks/bench_llava.py --out benchmarks/results.json
--md BENCHMARKS.md`). Nothing else should use the CPU while it runs.

On a GPU: `--device cuda` (benchmarks/cuda_batch16.md and cuda_batch128.md hold such runs).
Everything above holds, with these differences: timings synchronise the device before reading
the clock; the peak is the device's measured matmul rate (fp32 without TF32, and bf16); float32 runs with TF32 off on both
sides (convolutions included), so the parity check and the fp32 rows compare true float32;
bf16 rows are CUDA autocast.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from tessera.connectors.projector import ProjectorConfig
from tessera.data.collate import Batch, Sample, pack_collate, pad_collate
from tessera.data.datasets import ConversationDataset, ImageCache, group_by_image
from tessera.data.images import ImageTransform
from tessera.data.readers import read_coco_captions, read_llava, shapes_split_paths
from tessera.data.records import SkipStats, Turn
from tessera.data.shapes import ShapesConfig, generate_shapes
from tessera.data.templates import IGNORE_INDEX, encode_prompt
from tessera.infer.generate import GenerationConfig, generate
from tessera.interop.hf_keys import (
    clip_vision_state_dict_from_hf,
    llama_state_dict_from_hf,
    load_state_dict_strict,
)
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.objectives.lm import next_token_loss
from tessera.presets.llava import tiny
from tessera.text.tokenizer import Tokenizer, train_bpe
from tessera.train.trainer import move_to

TEMPLATE = "vicuna"
PARITY_TOLERANCE = 1e-4
# LLaVA v5 module prefixes of transformers' LlavaForConditionalGeneration.
HF_VISION = "model.vision_tower."
HF_PROJECTOR = "model.multi_modal_projector."
HF_LLM = "model.language_model."


# ------------------------------------------------------------------------------ data


@dataclass
class Workload:
    tokenizer: Tokenizer
    mixed: list[Sample]  # real conversations, mixed lengths, images as uint8
    dense: list[Sample]  # the same kind cropped to one length
    prompts: list[list[int]]  # generation prompts, placeholders expanded
    prompt_images: list[Tensor]  # uint8, one per prompt
    images: ImageCache


def build_workload(root: Path, num_images: int, batch_size: int, dense_length: int,
                   gen_batch: int, image_tokens: int, seed: int) -> Workload:
    """A small ShapesWorld, a tokenizer trained on it, and the batches every section uses."""
    generate_shapes(ShapesConfig(seed=seed, num_train=num_images, num_val=0, num_test=0, num_test_comp=0),
                    root, progress=False)
    paths = shapes_split_paths(root, "train")
    captions, _ = read_coco_captions(paths["captions"], root)
    convs, _ = read_llava(paths["llava_instruct"], root)
    corpus = [c.caption for c in captions]
    corpus += [" ".join(t.text.replace("<image>", "").strip() for t in c.turns) for c in convs]
    tokenizer = train_bpe(corpus, vocab_size=tiny().tokenizer_vocab_size)

    skips = SkipStats()
    size = tiny().vision.image_size
    images = ImageCache(ImageTransform(size=(size, size)), skips)
    # LLaVA-1.5 stage 2 merges an image's questions into multi-turn conversations.
    grouped = group_by_image(convs, seed=seed)
    dataset = ConversationDataset(grouped, tokenizer, TEMPLATE, images, lambda h, w: image_tokens,
                                  max_length=512)
    samples = [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]
    random.Random(seed).shuffle(samples)
    mixed = samples[:batch_size]
    long_enough = [s for s in samples if len(s.input_ids) >= dense_length]
    if len(long_enough) < batch_size:
        raise SystemExit(f"only {len(long_enough)} conversations reach {dense_length} tokens; "
                         "raise --num-images or lower --dense-length")
    dense = [Sample(s.input_ids[:dense_length], s.labels[:dense_length], s.images)
             for s in long_enough[:batch_size]]

    firsts = [c for c in convs if c.turns[0].role == "user"][:gen_batch]
    prompts = [encode_prompt(tokenizer, TEMPLATE, [Turn("user", c.turns[0].text)], [image_tokens])
               for c in firsts]
    prompt_images = [images.get(c.images[0]) for c in firsts]
    return Workload(tokenizer, mixed, dense, prompts, prompt_images, images)


def hf_padded(samples: Sequence[Sample], pad_id: int, images: ImageCache) -> dict[str, Tensor]:
    """transformers' usual training batch: right-padded ids, a 0/1 mask, unshifted labels with
    -100 at padding and unsupervised positions (the model shifts them itself)."""
    longest = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    pixels = torch.stack([images.normalize(img) for s in samples for img in s.images])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def tessera_batch(samples: Sequence[Sample], pad_id: int, images: ImageCache, packed: bool) -> Batch:
    if packed:
        batch = pack_collate(samples, pad_id)
    else:
        # Equal lengths: a plain (B, L) batch needs neither a mask nor explicit positions.
        batch = pad_collate(samples, pad_id)
        if not bool(batch.attention_mask.all()):
            raise ValueError("the dense batch must have one length")
        batch.attention_mask = None
        batch.position_ids = None
    batch.images = [images.normalize(img) for img in batch.images]
    return batch


# ---------------------------------------------------------------------------- models


def hf_llava_config(vocab_size: int, image_token_id: int, image_tokens: int) -> transformers.LlavaConfig:
    preset = tiny()
    v, t = preset.vision, preset.llm
    vision = transformers.CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        intermediate_size=v.intermediate_size, hidden_act=v.act, layer_norm_eps=v.layer_norm_eps,
    )
    text = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
    )
    return transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=preset.vision_feature_layer, vision_feature_select_strategy="default",
        projector_hidden_act=preset.connector.act, multimodal_projector_bias=preset.connector.bias,
        image_seq_length=image_tokens, tie_word_embeddings=False,
    )


def tessera_config(vocab_size: int, image_token_id: int) -> LVLMConfig:
    preset = tiny()
    return LVLMConfig(
        # transformers' LLaVA has CLIP's single patch convolution, not the tiny preset's conv stem:
        # both sides run the same architecture with the same weights.
        vision=preset.vision.model_copy(update={"patch_embed": "patch", "stem_width": None}), connector=ProjectorConfig(kind="mlp", act=preset.connector.act),
        llm=preset.llm.model_copy(update={"vocab_size": vocab_size}),
        image_token_id=image_token_id, vision_feature_layer=preset.vision_feature_layer,
    )


def randomize_(model: nn.Module, seed: int) -> None:
    """Unit-scale weights: a wrong computation then shows far above float32 rounding (the
    default 0.02 init makes every logit nearly the same)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                gain = "norm" in name and name.endswith("weight")
                p.copy_(1.0 + 0.2 * noise if gain else 0.1 * noise)
            elif "embed" in name and p.dim() == 2:
                p.copy_(noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def tessera_state_from_hf_llava(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LlavaForConditionalGeneration keys (transformers ≥ 5) → LVLM keys, through the CLIP
    and LLaMA mappings of tessera.interop.hf_keys."""
    vision = {k[len(HF_VISION):]: v for k, v in hf_state.items() if k.startswith(HF_VISION)}
    projector = {k[len(HF_PROJECTOR):]: v for k, v in hf_state.items() if k.startswith(HF_PROJECTOR)}
    llm = {"model." + k[len(HF_LLM):]: v for k, v in hf_state.items() if k.startswith(HF_LLM)}
    llm["lm_head.weight"] = hf_state["lm_head.weight"]
    state = {f"vision_tower.{k}": v for k, v in clip_vision_state_dict_from_hf(vision).items()}
    state |= {f"connector.{k}": v for k, v in projector.items()}
    state |= {f"language_model.{k}": v
              for k, v in llama_state_dict_from_hf(llm, tie_word_embeddings=False).items()}
    return state


def build_models(vocab_size: int, image_token_id: int, image_tokens: int, seed: int) -> tuple[LVLM, nn.Module]:
    hf = transformers.LlavaForConditionalGeneration(hf_llava_config(vocab_size, image_token_id, image_tokens))
    randomize_(hf, seed)
    ours = LVLM(tessera_config(vocab_size, image_token_id))
    load_state_dict_strict(ours, tessera_state_from_hf_llava(hf.state_dict()), "transformers LLaVA")
    if ours.num_image_tokens(64, 64) != image_tokens:
        raise ValueError("image token counts differ")
    return ours, hf


def freeze_vision(model: nn.Module, tower: nn.Module) -> list[nn.Parameter]:
    """LLaVA stage 2: the ViT is frozen (and in eval mode), everything else trains."""
    model.train()
    for p in tower.parameters():
        p.requires_grad_(False)
    tower.eval()
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- parity


def tessera_logits(model: LVLM, batch: Batch) -> Tensor:
    hidden = model(batch.input_ids, batch.images, position_ids=batch.position_ids,
                   cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask)
    return model.language_model.logits(hidden)


def check_parity(ours: LVLM, hf: nn.Module, ours_batch: Batch, hf_batch: dict[str, Tensor], name: str) -> dict[str, float]:
    """Max |Δ| of the logits at every real token, and |Δ| of the losses."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        reference = hf(**hf_batch)
        logits = tessera_logits(ours, ours_batch)
        # The loss as the timed step computes it: last layer on the supervised rows only.
        kept = ours(ours_batch.input_ids, ours_batch.images, position_ids=ours_batch.position_ids,
                    cu_seqlens=ours_batch.cu_seqlens, attention_mask=ours_batch.attention_mask,
                    keep=ours_batch.targets != IGNORE_INDEX)
        loss = next_token_loss(kept, ours.language_model.lm_head, ours_batch.targets)
    real = hf_batch["attention_mask"].bool() if "attention_mask" in hf_batch else None
    ref = reference.logits[real] if real is not None else reference.logits.reshape(-1, logits.shape[-1])
    diff = (logits.reshape(-1, logits.shape[-1]) - ref).abs().max().item()
    loss_diff = abs(loss.item() - reference.loss.item())
    print(f"[parity] {name}: max |Δ logits| {diff:.2e} (|logits| ≤ {ref.abs().max().item():.1f}), "
          f"|Δ loss| {loss_diff:.2e}", flush=True)
    if diff > PARITY_TOLERANCE or loss_diff > PARITY_TOLERANCE:
        raise SystemExit(f"parity check failed for {name}: the models differ; nothing timed")
    return {"max_abs_logit_diff": diff, "abs_loss_diff": loss_diff}


# --------------------------------------------------------------------------- timing


class CpuMonitor:
    """Share of the machine's CPU time that OTHER processes used while timing ran: the
    benchmark's figures are only meaningful when it is near 0 (two processes using torch's
    threads on the same cores slow each other down several times)."""

    def __init__(self) -> None:
        self.other = self.wall = self.last_other = self.last_wall = 0.0

    @staticmethod
    def _busy() -> float:
        """CPU seconds all processes have used since boot (Linux /proc/stat; 0 elsewhere)."""
        try:
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except OSError:
            return 0.0
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait

    @staticmethod
    def _own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self) -> CpuMonitor:
        self._start = (time.perf_counter(), self._busy(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = self._start
        self.last_wall = time.perf_counter() - wall
        self.last_other = max(0.0, (self._busy() - busy) - (self._own() - own))
        self.wall += self.last_wall
        self.other += self.last_other

    @property
    def last_share(self) -> float:
        """other_share of the latest measured stretch alone."""
        return self.last_other / (self.last_wall * (os.cpu_count() or 1)) if self.last_wall else 0.0

    @property
    def other_share(self) -> float:
        return self.other / (self.wall * (os.cpu_count() or 1)) if self.wall else 0.0


MONITOR = CpuMonitor()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: GPU calls return before their kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, reps: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating them so drifts in machine speed hit both."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    try:
        with MONITOR:
            for _ in range(reps):
                for name, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def matmul_peak(n: int, reps: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n×n by n×n matmul in `dtype` over `reps` tries."""
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype, device=device)
    for _ in range(2):
        torch.mm(a, b, out=out)
    synchronize(device)
    best = float("inf")
    with MONITOR:
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def tessera_step(model: LVLM, opt: torch.optim.Optimizer, batch: Batch, bf16: bool,
                 keep: bool = True) -> Callable[[], None]:
    """One step as Tessera trains: the loss reads only the supervised positions, so the
    decoder is told (`keep`) and runs its last layer's queries and MLP on those alone."""
    def step() -> None:
        with torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = model(batch.input_ids, batch.images, position_ids=batch.position_ids,
                           cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask,
                           keep=batch.targets != IGNORE_INDEX if keep else None)
            loss = next_token_loss(hidden, model.language_model.lm_head, batch.targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Tensor], bf16: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def train_step_flops(model: LVLM, samples: Sequence[Sample]) -> dict[str, float]:
    """The docstring's F for one step over `samples` (unpadded), by part; `nominal_total` is the
    usual 6·P·T convention instead (every layer at every position, full causal attention)."""
    cfg = model.cfg
    v = cfg.vision
    k = cfg.vision_layers_run
    patches = v.grid**2
    s_v = patches + int(v.class_token)
    num_images = sum(len(s.images) for s in samples)
    layer_v = matmul_params(model.vision_tower.encoder.layers[0])
    patch_kernel = model.vision_tower.embeddings.patch_embedding.weight.numel()
    vit = 2 * num_images * (s_v * layer_v * k + 2 * k * s_v**2 * v.hidden_size + patches * patch_kernel)
    connector = 6 * patches * num_images * matmul_params(model.connector)

    llm = model.language_model
    lengths = [len(s.input_ids) for s in samples]
    # Positions (within their sample) whose state the loss reads: the supervised ones.
    kept = [p for s in samples for p, t in enumerate(s.targets) if t != IGNORE_INDEX]
    tokens, supervised = sum(lengths), len(kept)
    p_layer = matmul_params(llm.layers[0])
    last = llm.layers[-1].self_attn
    p_kv = last.k_proj.weight.numel() + last.v_proj.weight.numel()
    n_layers = cfg.llm.num_layers
    layers = 6 * (tokens * (n_layers - 1) * p_layer + tokens * p_kv + supervised * (p_layer - p_kv))
    e_q = cfg.llm.num_heads * cfg.llm.dim_per_head
    causal_pairs = sum(n * (n + 1) / 2 for n in lengths)
    attn = 3 * 4 * e_q * ((n_layers - 1) * causal_pairs + sum(p + 1 for p in kept))
    head = 6 * supervised * llm.lm_head.weight.numel()
    parts = {"vit": vit, "connector": connector, "llm_layers": layers, "llm_attention": attn, "lm_head": head}
    parts["total"] = sum(parts.values())
    parts["nominal_total"] = (vit + connector + 6 * tokens * n_layers * p_layer
                              + 3 * 4 * e_q * n_layers * causal_pairs + head)
    return parts


# ----------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        flags = set(info.get("flags", "").split())
        vector = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16")) if flag in flags]
        cpu = (f"{info.get('model name', cpu)} (family {info.get('cpu family', '?')}, model "
               f"{info.get('model', '?')}{'; ' + ', '.join(vector) if vector else ''})")
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def train_row(name: str, times: dict[str, list[float]], tokens: int, flops: float, peak: float) -> dict[str, Any]:
    ours, ref = statistics.median(times["tessera"]), statistics.median(times["transformers"])
    return {
        "name": name,
        "tessera_ms": ours * 1e3,
        "transformers_ms": ref * 1e3,
        "tessera_tokens_per_s": tokens / ours,
        "transformers_tokens_per_s": tokens / ref,
        "speedup": ref / ours,
        "tessera_mfu": flops / ours / peak,
        "transformers_mfu": flops / ref / peak,
        "tessera_ms_all": [t * 1e3 for t in times["tessera"]],
        "transformers_ms_all": [t * 1e3 for t in times["transformers"]],
    }


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    m, w, p, g = results["machine"], results["workload"], results["parity"], results["generate"]
    settings = results["settings"]
    table = [
        "| comparison | Tessera | transformers | speedup | Tessera tokens/s | transformers tokens/s "
        "| Tessera MFU | transformers MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["train"]:
        table.append(
            f"| {row['name']} | {row['tessera_ms']:.0f} ms | {row['transformers_ms']:.0f} ms | "
            f"**{row['speedup']:.2f}×** | {row['tessera_tokens_per_s']:,.0f} | "
            f"{row['transformers_tokens_per_s']:,.0f} | {row['tessera_mfu']:.1%} | {row['transformers_mfu']:.1%} |"
        )
    table.append(
        f"| generation, {w['gen_batch']} × {w['new_tokens']} new tokens | {g['tessera_ms']:.0f} ms | "
        f"{g['transformers_ms']:.0f} ms | **{g['speedup']:.2f}×** | {g['tessera_tokens_per_s']:,.0f} | "
        f"{g['transformers_tokens_per_s']:,.0f} | | |"
    )
    ablation = [
        "| training step | Tessera, last layer on supervised rows only | Tessera, last layer everywhere "
        "| transformers | speedup without it |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["train"]:
        if "tessera_all_positions_ms" in row:
            ablation.append(
                f"| {row['name']} | {row['tessera_ms']:.0f} ms | {row['tessera_all_positions_ms']:.0f} ms | "
                f"{row['transformers_ms']:.0f} ms | {row['speedup_without_keep']:.2f}× |"
            )
    bf16_peak = f", bf16 **{results['peak_flops_bf16'] / 1e9:.1f} GFLOP/s**" if results["peak_flops_bf16"] else ""
    command = (f"`make bench` (`{results['command']}`)" if settings.get("device", "cpu") == "cpu"
               else f"`{results['command']}`")
    gpu = f" GPU **{m['gpu']}** (the timed device; CPU:" if m.get("gpu") else ""
    gpu_end = ")" if m.get("gpu") else ""
    on = f", on {m['gpu']}" if m.get("gpu") else ""
    text = f"""# Benchmarks: tiny LLaVA-1.5, Tessera vs transformers{on}

Same model dimensions, same weights (copied from transformers' `LlavaForConditionalGeneration`
into Tessera's `LVLM`), same data, same machine, one run. Medians of {settings['reps']} training and
{settings['gen_reps']} generation repetitions after warm-up, the two libraries interleaved; speedup =
transformers time / Tessera time. How each figure is made, and the FLOP formula behind MFU: the
docstring of `benchmarks/bench_llava.py`.

Command: {command}, {results['date']}.

Machine:{gpu} {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads{gpu_end}, torch {m['torch']}, transformers
{m['transformers']}, Python {m['python']}; other processes used {m['other_processes_cpu_share']:.1%} of the CPU
while timing ran.
Matmul peak measured in the run ({settings['peak_matmul_size']}² matmuls, best of {settings['peak_reps']}): fp32
**{results['peak_flops'] / 1e9:.1f} GFLOP/s**{bf16_peak}; MFU is against the fp32 peak, and against the bf16
one for the bf16 autocast rows.

{chr(10).join(table)}

**MFU** of Tessera's mixed-length training step: **{results['mfu']:.1%}** of the measured peak, on the
useful FLOPs (transformers, charged the same FLOPs: {results['train'][0]['transformers_mfu']:.1%}). On the
common 6·P·T count, which credits Tessera with the last-layer work it skips: {results['mfu_nominal']:.1%}.

Where the training speedup comes from: Tessera's loss reads the supervised positions only, so its
decoder runs the last layer's queries, attention output and MLP on those rows alone (keys and
values still at every position); without that, as transformers computes:

{chr(10).join(ablation)}

Without it, the mixed-length gain is mostly the padding transformers computes; on dense sequences
the two then do nearly the same work (transformers' extra: logits and log-softmax at every position,
its fourth ViT layer, computed and then discarded by vision_feature_layer=-2). Generation uses the
same idea in the prefill (last layer for the last column only), and keeps its per-step bookkeeping
in Python; both sides generate with a KV cache and produce the same tokens.

Workload: {w['batch_size']} ShapesWorld conversations grouped by image (vicuna template, {w['image_tokens']}
image tokens each, vocabulary {w['vocab_size']} = the BPE tokenizer trained on the data): {w['mixed_tokens']}
real tokens, lengths {w['mixed_min']}–{w['mixed_max']}, {w['mixed_supervised']} supervised; transformers pads
them to {w['mixed_padded_tokens']} tokens ({w['padding_fraction']:.0%} padding). Dense: {w['batch_size']} ×
{w['dense_length']} tokens cropped from such conversations. Training: AdamW on connector + LLM
({w['trainable_params']:,} parameters), ViT frozen. Generation: {w['gen_batch']} prompts of {w['prompt_min']}–{w['prompt_max']}
tokens, one image each, left-padded, greedy, KV cache; outputs identical: {p['generated_tokens_identical']}.

Parity before timing (float32): max |Δ logits| {p['mixed']['max_abs_logit_diff']:.1e} on the mixed batch
(Tessera packed vs transformers padded) and {p['dense']['max_abs_logit_diff']:.1e} on the dense one;
|Δ loss| ≤ {max(p['mixed']['abs_loss_diff'], p['dense']['abs_loss_diff']):.1e}.
"""
    if m.get("gpu"):
        text += """
On the GPU at this model size, a step is bound by the host issuing kernels (hundreds of small
launches per step), not by the GPU's arithmetic: hence the low MFU, bf16 no faster than float32,
and no gain from skipping the last layer's rows. Packed rows and selected queries run as ONE
padded attention call here (the CPU runs one call per sample); see `tessera.nn.attention`.
"""
    if results.get("notes"):
        text += "\n" + "\n".join(f"- {n}" for n in results["notes"]) + "\n"
    path.write_text(text)


# ------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--md", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--gen-reps", type=int, default=10)
    parser.add_argument("--num-images", type=int, default=120, help="ShapesWorld train images to generate")
    parser.add_argument("--batch-size", type=int, default=16)
    # 192: since repeated question/answer pairs are dropped when an image's questions are merged
    # (group_by_image), no conversation of 120 images reaches 256 tokens any more.
    parser.add_argument("--dense-length", type=int, default=192)
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--peak-reps", type=int, default=8)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--note", action="append", default=[], help="a line added under the report (repeatable)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        # True float32 on both sides: the parity check and the fp32 rows compare like with like.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine(device)
    print(f"[bench] {info}", flush=True)
    image_tokens = tiny().vision.grid ** 2

    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as tmp:
        work = build_workload(Path(tmp), args.num_images, args.batch_size, args.dense_length,
                              args.gen_batch, image_tokens, args.seed)
    tok = work.tokenizer
    ours, hf = build_models(tok.vocab_size, tok.image_id, image_tokens, args.seed)
    ours, hf = ours.to(device), hf.to(device)
    mixed_ours = move_to(tessera_batch(work.mixed, tok.pad_id, work.images, packed=True), device)
    mixed_hf = move_to(hf_padded(work.mixed, tok.pad_id, work.images), device)
    dense_ours = move_to(tessera_batch(work.dense, tok.pad_id, work.images, packed=False), device)
    dense_hf = move_to(hf_padded(work.dense, tok.pad_id, work.images), device)
    del dense_hf["attention_mask"]  # no padding: transformers' plain causal path

    parity = {"mixed": check_parity(ours, hf, mixed_ours, mixed_hf, "mixed lengths"),
              "dense": check_parity(ours, hf, dense_ours, dense_hf, "dense")}

    # Generation first, while both models still hold the identical weights.
    gen_pixels = [work.images.normalize(img).to(device) for img in work.prompt_images]
    longest = max(len(p) for p in work.prompts)
    gen_ids = torch.full((len(work.prompts), longest), tok.pad_id, dtype=torch.long)
    gen_mask = torch.zeros_like(gen_ids)
    for row, p in enumerate(work.prompts):
        gen_ids[row, longest - len(p):] = torch.tensor(p)
        gen_mask[row, longest - len(p):] = 1
    never = [-1]  # a stop id no token can equal: every row runs the full length
    gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens)
    hf_kwargs = dict(input_ids=gen_ids.to(device), attention_mask=gen_mask.to(device),
                     pixel_values=torch.stack(gen_pixels),
                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                     pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)

    def run_ours() -> list[list[int]]:
        return generate(ours, work.prompts, gen_pixels, stop_ids=never, pad_id=tok.pad_id, config=gen_cfg)

    def run_hf() -> Tensor:
        with torch.no_grad():
            return hf.generate(**hf_kwargs)

    ours.eval()
    hf.eval()
    ours_tokens = run_ours()
    hf_tokens = run_hf()[:, longest:].tolist()
    same = ours_tokens == hf_tokens
    counts = {len(t) for t in ours_tokens} | {len(t) for t in hf_tokens}
    print(f"[generate] identical greedy outputs: {same}; new tokens per row: {sorted(counts)}", flush=True)
    if counts != {args.new_tokens}:
        raise SystemExit("the two sides generated different token counts")
    parity["generated_tokens_identical"] = same
    gen_times = time_interleaved({"tessera": run_ours, "transformers": run_hf}, 2, args.gen_reps, device)
    gen_share = MONITOR.last_share
    new_tokens = len(work.prompts) * args.new_tokens
    g_ours, g_ref = statistics.median(gen_times["tessera"]), statistics.median(gen_times["transformers"])
    gen = {
        "tessera_ms": g_ours * 1e3, "transformers_ms": g_ref * 1e3,
        "tessera_tokens_per_s": new_tokens / g_ours, "transformers_tokens_per_s": new_tokens / g_ref,
        "speedup": g_ref / g_ours,
        "other_processes_cpu_share": gen_share,
        "tessera_ms_all": [t * 1e3 for t in gen_times["tessera"]],
        "transformers_ms_all": [t * 1e3 for t in gen_times["transformers"]],
    }
    print(f"[generate] tessera {gen['tessera_ms']:.1f} ms, transformers {gen['transformers_ms']:.1f} ms, "
          f"speedup {gen['speedup']:.2f}x", flush=True)

    peak = matmul_peak(args.peak_size, args.peak_reps, device)
    # Under bf16 autocast the matmuls run in bf16: those rows are measured against its peak.
    peak_bf16 = None if args.no_bf16 else matmul_peak(args.peak_size, args.peak_reps, device, torch.bfloat16)
    print(f"[peak] fp32 matmul {peak / 1e9:.1f} GFLOP/s"
          + (f", bf16 {peak_bf16 / 1e9:.1f} GFLOP/s" if peak_bf16 else ""), flush=True)

    ours_params = freeze_vision(ours, ours.vision_tower)
    hf_params = freeze_vision(hf, hf.model.vision_tower)
    trainable = sum(p.numel() for p in ours_params)
    if trainable != sum(p.numel() for p in hf_params):
        raise ValueError("the two models train different parameter counts")
    opt_ours = torch.optim.AdamW(ours_params, lr=1e-4)
    opt_hf = torch.optim.AdamW(hf_params, lr=1e-4)

    mixed_lengths = [len(s.input_ids) for s in work.mixed]
    cases = [("train step, mixed lengths", mixed_ours, mixed_hf, work.mixed, False),
             ("train step, dense", dense_ours, dense_hf, work.dense, False)]
    if not args.no_bf16:
        cases += [("train step, mixed lengths, bf16 autocast", mixed_ours, mixed_hf, work.mixed, True),
                  ("train step, dense, bf16 autocast", dense_ours, dense_hf, work.dense, True)]
    rows = []
    flops_by_case = {}
    for name, b_ours, b_hf, samples, bf16 in cases:
        flops = train_step_flops(ours, samples)
        flops_by_case[name] = flops
        lengths = [len(s.input_ids) for s in samples]
        fns = {"tessera": tessera_step(ours, opt_ours, b_ours, bf16),
               "transformers": hf_step(hf, opt_hf, b_hf, bf16)}
        if not bf16:
            # Ablation: Tessera running its last layer on every position, as transformers does.
            fns["tessera_all_positions"] = tessera_step(ours, opt_ours, b_ours, bf16, keep=False)
        times = time_interleaved(fns, args.warmup, args.reps, device)
        row_peak = peak_bf16 if bf16 else peak
        row = train_row(name, times, sum(lengths), flops["total"], row_peak)
        row["other_processes_cpu_share"] = MONITOR.last_share
        row["tessera_mfu_nominal"] = flops["nominal_total"] / (row["tessera_ms"] / 1e3) / row_peak
        if "tessera_all_positions" in times:
            row["tessera_all_positions_ms"] = median_ms(times["tessera_all_positions"])
            row["speedup_without_keep"] = statistics.median(times["transformers"]) / statistics.median(
                times["tessera_all_positions"])
        rows.append(row)
        print(f"[train] {name}: tessera {row['tessera_ms']:.1f} ms, transformers {row['transformers_ms']:.1f} ms, "
              f"speedup {row['speedup']:.2f}x, mfu {row['tessera_mfu']:.1%}", flush=True)

    info["other_processes_cpu_share"] = MONITOR.other_share
    if MONITOR.other_share > 0.05:
        print(f"[bench] WARNING: other processes used {MONITOR.other_share:.0%} of the CPU while timing; "
              "the figures are not trustworthy", flush=True)
    mixed_padded = mixed_hf["input_ids"].numel()
    prompt_lengths = [len(p) for p in work.prompts]
    results = {
        "train_step_speedup_vs_transformers": rows[0]["speedup"],
        "train_step_dense_speedup_vs_transformers": rows[1]["speedup"],
        "generate_speedup_vs_transformers": gen["speedup"],
        "mfu": rows[0]["tessera_mfu"],
        "mfu_nominal": rows[0]["tessera_mfu_nominal"],
        "train": rows,
        "generate": gen,
        "peak_flops": peak,
        "peak_flops_bf16": peak_bf16,
        "model_flops": flops_by_case,
        "parity": parity,
        "workload": {
            "batch_size": args.batch_size, "image_tokens": image_tokens, "vocab_size": tok.vocab_size,
            "mixed_tokens": sum(mixed_lengths), "mixed_min": min(mixed_lengths), "mixed_max": max(mixed_lengths),
            "mixed_lengths": mixed_lengths, "mixed_padded_tokens": mixed_padded,
            "padding_fraction": 1 - sum(mixed_lengths) / mixed_padded,
            "mixed_supervised": mixed_ours.num_target_tokens, "dense_length": args.dense_length,
            "dense_supervised": dense_ours.num_target_tokens, "trainable_params": trainable,
            "gen_batch": len(work.prompts), "new_tokens": args.new_tokens,
            "prompt_min": min(prompt_lengths), "prompt_max": max(prompt_lengths),
        },
        "settings": {"warmup": args.warmup, "reps": args.reps, "gen_reps": args.gen_reps,
                     "peak_matmul_size": args.peak_size, "peak_reps": args.peak_reps, "dtype": "float32",
                     "device": str(device),
                     "transformers_attention": hf.config._attn_implementation},
        "machine": info,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "notes": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.md, results)
    print(f"[bench] wrote {args.out} and {args.md}", flush=True)


if __name__ == "__main__":
    main()
