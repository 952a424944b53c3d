"""On a CUDA GPU, the same computations as on the CPU: the padded attention layouts the GPU
takes, and a whole training run (packed and padded conversations through an LVLM, the decoder's
selected queries). Skipped where no GPU is (CI); run them when a session has one:
`pytest tests/test_cuda.py`. Float32 with TF32 off, so only summation order differs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_trainer import FakeConversations, stage, tiny_lvlm

from tessera.nn.attention import attention, selected_query_attention
from tessera.train.tasks import ConversationTask
from tessera.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _true_float32() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_on_the_gpu_equals_the_cpu(causal: bool) -> None:
    lengths = [7, 1, 30, 0, 12]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = torch.randn(1, 8, sum(lengths), 16), torch.randn(1, 2, sum(lengths), 16), torch.randn(1, 2, sum(lengths), 16)
    want = attention(q, k, v, causal=causal, cu_seqlens=cu)
    got = attention(q.cuda(), k.cuda(), v.cuda(), causal=causal, cu_seqlens=cu.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_selected_queries_on_the_gpu_equal_the_cpu() -> None:
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[0, [3, 4, 19]] = keep[1, 7] = keep[2, [0, 10, 11, 12]] = True
    real = torch.ones(3, 20, dtype=torch.bool)
    real[0, :2] = False  # a left-padded row
    q = torch.randn(int(keep.sum()), 4, 8)
    k, v = torch.randn(3, 2, 20, 8), torch.randn(3, 2, 20, 8)
    want = selected_query_attention(q, k, v, keep, key_padding_mask=real)
    got = selected_query_attention(q.cuda(), k.cuda(), v.cuda(), keep.cuda(), key_padding_mask=real.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_a_training_run_on_the_gpu_ends_where_the_cpu_run_ends(packing: bool) -> None:
    """6 steps of an LVLM on conversations (ViT, connector, decoder with selected queries):
    the weights agree, and the model comes back to the CPU."""
    runs = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = tiny_lvlm()
        result = Trainer(model, stage(packing=packing), ConversationTask(FakeConversations(model), packing=packing),
                         progress=False, device=device).fit()
        assert next(model.parameters()).device.type == "cpu"
        runs.append((model.state_dict(), [h["loss"] for h in result.history]))
    (cpu_state, cpu_losses), (gpu_state, gpu_losses) = runs
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-3)
    # A key projection's bias adds the same q·b to every logit of a query, so softmax gives it a
    # zero gradient; AdamW scales what rounding leaves there to full-size steps of either sign.
    off = {name: float((gpu_state[name] - value).abs().max()) for name, value in cpu_state.items()
           if not name.endswith("k_proj.bias") and not torch.allclose(gpu_state[name], value, rtol=1e-3, atol=1e-4)}
    assert not off, off


def test_generation_on_the_gpu_writes_what_the_cpu_writes() -> None:
    """Greedy decoding with the KV cache, images handed over on the CPU (as eval and chat do)."""
    from tessera.infer.generate import GenerationConfig, generate

    model = tiny_lvlm().eval()
    n_img = model.num_image_tokens(16, 16)
    prompts = [[1] + [5] * n_img + [20, 21, 22], [1] + [5] * n_img + [30]]
    images = [torch.rand(3, 16, 16), torch.rand(3, 16, 16)]
    kwargs = dict(stop_ids=[2], pad_id=0, config=GenerationConfig(max_new_tokens=12))
    want = generate(model, prompts, images, **kwargs)
    got = generate(model.cuda(), prompts, images, **kwargs)
    assert got == want and all(len(row) > 0 for row in want)
