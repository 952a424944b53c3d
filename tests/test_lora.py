"""LoRA: adapters on named linear layers, merge = unmerged output, adapters saved and reloaded
on their own, a LoRA stage in the trainer (what trains, resume keeps connector and adapters),
and the PEFT export that peft loads onto the exported transformers model with logits parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tessera.connectors.projector import ProjectorConfig
from tessera.models.lvlm import LVLM, LVLMConfig
from tessera.nn.lora import (
    LoraConfig,
    apply_lora,
    load_lora,
    lora_config,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
)
from tessera.text.llama import LlamaConfig, LlamaDecoder
from tessera.train.checkpoint import load_checkpoint, save_checkpoint
from tessera.train.stage import StageConfig
from tessera.train.tasks import ConversationTask, LanguageModelTask
from tessera.train.trainer import Trainer
from tessera.vision.vit import ViTConfig

TINY_LLM = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
TINY_VIT = ViTConfig(
    image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
)
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def random_adapters_(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (a fresh adapter is an exact no-op, which would hide every bug)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=gen) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.3)


def logits(model: LlamaDecoder) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(IDS))


def test_fresh_adapters_change_nothing_and_keep_base_keys() -> None:
    model = LlamaDecoder(TINY_LLM).eval()
    keys = list(model.state_dict())
    before = logits(model)
    names = apply_lora(model, rank=4, alpha=8)
    assert names == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert torch.equal(logits(model), before)
    state = model.state_dict()
    assert [k for k in state if "lora_" not in k] == keys  # base keys unchanged, same order
    assert sorted(k for k in state if "lora_" in k) == sorted(lora_state_dict(model))
    assert model.layers[0].self_attn.q_proj.lora_A.weight.shape == (4, 32)
    assert model.layers[0].self_attn.v_proj.lora_B.weight.shape == (16, 4)  # GQA: 2 kv heads × 8
    assert lora_config(model) == LoraConfig(rank=4, alpha=8)


def test_merge_equals_unmerged_output() -> None:
    model = LlamaDecoder(TINY_LLM).eval()
    keys = list(model.state_dict())
    apply_lora(model, targets=["q_proj", "v_proj", "down_proj"], rank=4, alpha=12)
    random_adapters_(model)
    q = model.layers[1].self_attn.q_proj
    expected_q = q.weight.detach() + 3.0 * q.lora_B.weight.detach() @ q.lora_A.weight.detach()
    with_adapters = logits(model)
    assert (with_adapters - logits(remove_lora(_copy(model)))).abs().max() > 1e-2  # adapters matter
    merge_lora(model)
    assert not lora_modules(model) and lora_config(model) is None
    assert type(model.layers[1].self_attn.q_proj) is nn.Linear
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.layers[1].self_attn.q_proj.weight, expected_q)
    torch.testing.assert_close(logits(model), with_adapters, atol=1e-5, rtol=0)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_dropout_only_in_training() -> None:
    model = LlamaDecoder(TINY_LLM)
    apply_lora(model, rank=4, alpha=8, dropout=0.5)
    random_adapters_(model)
    model.eval()
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.equal(logits(model), logits(model))


def test_bad_targets_and_reapplying() -> None:
    model = LlamaDecoder(TINY_LLM)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, targets=["query"])
    with pytest.raises(ValueError, match="not nn.Linear"):
        apply_lora(model, targets=["mlp"])
    with pytest.raises(ValueError, match="field 'rank'"):
        apply_lora(model, rank=0)
    names = apply_lora(model, rank=4)
    first = model.layers[0].self_attn.q_proj
    assert apply_lora(model, LoraConfig(rank=4)) == names  # same config: kept, not wrapped twice
    assert model.layers[0].self_attn.q_proj is first and type(first.weight) is nn.Parameter
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, rank=8)


def test_within_keeps_the_vision_tower_out() -> None:
    model = LVLM(LVLMConfig(vision=TINY_VIT, llm=TINY_LLM, image_token_id=5))
    names = apply_lora(model, rank=2, within=["language_model"])
    assert names and all(n.startswith("language_model.layers.") for n in names)
    assert type(model.vision_tower.encoder.layers[0].self_attn.q_proj) is nn.Linear
    everywhere = LVLM(LVLMConfig(vision=TINY_VIT, llm=TINY_LLM, image_token_id=5))
    assert any(n.startswith("vision_tower") for n in apply_lora(everywhere, rank=2))


def test_merging_into_a_tied_weight_is_refused() -> None:
    model = LlamaDecoder(TINY_LLM.model_copy(update={"tie_word_embeddings": True}))
    apply_lora(model, targets=["lm_head"], rank=2)
    with pytest.raises(ValueError, match="tied weight"):
        merge_lora(model)
    assert model.lm_head.weight is model.embed_tokens.weight  # the tie survived the adapter


def test_adapters_save_and_reload_on_their_own(tmp_path: Path) -> None:
    torch.manual_seed(3)
    base = LlamaDecoder(TINY_LLM).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    apply_lora(base, targets=["q_proj", "o_proj"], rank=3, alpha=6)
    random_adapters_(base)
    expected = logits(base)
    folder = save_lora(base, tmp_path / "adapter")
    saved = load_file(str(folder / "lora_adapter.safetensors"))
    assert set(saved) == set(lora_state_dict(base))  # the adapters only, no base weight
    other = LlamaDecoder(TINY_LLM).eval()
    other.load_state_dict(base_state)
    assert load_lora(other, folder) == list(lora_modules(base))
    torch.testing.assert_close(logits(other), expected, atol=0, rtol=0)

    with pytest.raises(FileNotFoundError, match="lora_config.json is missing"):
        load_lora(LlamaDecoder(TINY_LLM), tmp_path)
    wider = LlamaDecoder(TINY_LLM.model_copy(update={"hidden_size": 48}))
    with pytest.raises(ValueError, match="shape"):
        load_lora(wider, folder)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_lora(LlamaDecoder(TINY_LLM), tmp_path / "none")


# --- the trainer -------------------------------------------------------------------------------


def _fake_conversations(model: LVLM):  # the trainer tests' dataset: fixed samples, one image each
    from test_trainer import FakeConversations

    return FakeConversations(model)


LORA_STAGE = dict(
    name="s",
    trainable=["connector"],
    steps=6,
    batch_size=4,
    lr=1e-2,
    warmup_steps=2,
    log_every=1,
    lora=LoraConfig(rank=4, alpha=8, within=["language_model"]),
)


def test_lora_stage_trains_adapters_and_named_modules_only() -> None:
    torch.manual_seed(0)
    model = LVLM(LVLMConfig(vision=TINY_VIT, llm=TINY_LLM, image_token_id=5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(
        model,
        StageConfig(**LORA_STAGE),
        ConversationTask(_fake_conversations(model), packing=True),
        progress=False,
    ).fit()
    adapters = sum(p.numel() for k, p in lora_state_dict(model).items())
    assert result.trainable.trainable == adapters + sum(
        p.numel() for p in model.connector.parameters()
    )
    assert adapters == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    for name, value in model.state_dict().items():
        if name in before:
            assert torch.equal(value, before[name]) != name.startswith("connector"), name
    assert all(
        not torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight))
        for m in lora_modules(model).values()
    )
    with pytest.raises(ValueError, match="unless lora is set"):
        StageConfig(**{**LORA_STAGE, "trainable": [], "lora": None})


def test_lora_alone_learns() -> None:
    torch.manual_seed(0)
    model = LlamaDecoder(TINY_LLM)
    from test_trainer import CharTokenizer

    task = LanguageModelTask(
        ["a red circle.", "a blue square.", "two green stars."] * 8, CharTokenizer(), 32
    )
    stage = StageConfig(
        name="lm",
        trainable=[],
        steps=40,
        batch_size=6,
        lr=1e-2,
        log_every=5,
        lora=LoraConfig(targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], rank=8),
    )
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(model, stage, task, progress=False).fit()
    assert result.history[-1]["loss"] < 0.6 * result.history[0]["loss"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())  # base untouched


def test_resume_keeps_connector_and_adapters(tmp_path: Path) -> None:
    def fresh() -> LVLM:
        torch.manual_seed(0)
        return LVLM(LVLMConfig(vision=TINY_VIT, llm=TINY_LLM, image_token_id=5))

    cfg = StageConfig(**LORA_STAGE)
    straight = fresh()
    Trainer(
        straight, cfg, ConversationTask(_fake_conversations(straight), packing=True), progress=False
    ).fit()

    interrupted = fresh()
    Trainer(
        interrupted,
        cfg,
        ConversationTask(_fake_conversations(interrupted), packing=True),
        out_dir=tmp_path,
        progress=False,
        stop_after=3,
    ).fit()
    step3 = tmp_path / "step-000003"
    assert json.loads((step3 / "config.json").read_text())["lora"] == cfg.lora.to_dict()
    saved = load_checkpoint(step3).model  # rebuilt with its adapters
    assert set(saved.state_dict()) == set(interrupted.state_dict())
    for name, value in interrupted.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name  # connector and adapters kept

    torch.manual_seed(123)
    resumed = fresh()  # fresh connector, no adapters yet: the resume must restore both
    Trainer(
        resumed, cfg, ConversationTask(_fake_conversations(resumed), packing=True), progress=False
    ).fit(resume_from=step3)
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # the final checkpoint loads with its adapters too
    save_checkpoint(tmp_path / "final", resumed)
    torch.testing.assert_close(
        load_checkpoint(tmp_path / "final").model.connector.linear_1.weight,
        straight.connector.linear_1.weight,
        atol=0,
        rtol=0,
    )


# --- PEFT export ------------------------------------------------------------------------------------


CORPUS = ["what color is the circle? blue", "USER: is there a red square? ASSISTANT: yes"] * 30


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tessera.text.tokenizer import train_bpe

    return train_bpe(CORPUS, vocab_size=300).save(tmp_path_factory.mktemp("tok"))


def _randomize_all_(model: nn.Module, seed: int) -> None:
    from test_parity_hf import randomize_

    randomize_(model, seed)  # base and adapters alike: large enough that mistakes show


def test_peft_export_of_a_llava_loads_in_peft_with_parity(
    tokenizer_file: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_parity_hf import HF_TOLERANCE, assert_close

    from tessera.interop import export_hf
    from tessera.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_file)
    vit = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
    )
    llm = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = LVLM(
        LVLMConfig(
            vision=vit,
            connector=ProjectorConfig(kind="mlp"),
            llm=llm,
            image_token_id=tokenizer.image_id,
        )
    ).eval()
    apply_lora(
        model,
        targets=["q_proj", "v_proj", "lm_head", "linear_1"],
        within=["language_model", "connector"],
        rank=4,
        alpha=8,
    )
    _randomize_all_(model, seed=1)
    save_checkpoint(
        tmp_path / "ckpt",
        model,
        tokenizer_file=tokenizer_file,
        meta={"template": "vicuna", "image_size": [32, 32]},
    )
    export_hf(tmp_path / "ckpt", tmp_path / "hf", adapter_out=tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert (
        "lm_head" in config["target_modules"]
        and "model.multi_modal_projector.linear_1" in config["target_modules"]
    )
    keys = list(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert len(keys) == 2 * (2 * 2 + 2) and all(k.startswith("base_model.model.") for k in keys)

    n_img = model.num_image_tokens(32, 32)
    ids = torch.tensor(
        [[tokenizer.bos_id] + [tokenizer.image_id] * n_img + tokenizer.encode("what color is it?")]
    )
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.language_model.logits(model(ids, [pixels[0]]))
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(
            tmp_path / "hf", attn_implementation="eager"
        )
        base_logits = hf.eval()(input_ids=ids, pixel_values=pixels).logits
        assert (
            base_logits - ours
        ).abs().max() > 1e-2  # the base alone differs: the adapters matter
        wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        injected = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
        assert len(injected) == len(lora_modules(model))  # exactly our modules, nothing extra
        assert_close(
            "peft llava logits",
            wrapped(input_ids=ids, pixel_values=pixels).logits,
            ours,
            HF_TOLERANCE,
        )

    # without adapter_out the adapters are merged into the exported weights
    export_hf(tmp_path / "ckpt", tmp_path / "merged")
    with torch.no_grad():
        merged = transformers.LlavaForConditionalGeneration.from_pretrained(
            tmp_path / "merged", attn_implementation="eager"
        ).eval()
        assert_close(
            "merged llava logits",
            merged(input_ids=ids, pixel_values=pixels).logits,
            ours,
            HF_TOLERANCE,
        )


def test_peft_export_of_a_decoder(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_parity_hf import HF_TOLERANCE, assert_close

    from tessera.interop import export_hf

    torch.manual_seed(0)
    model = LlamaDecoder(
        TINY_LLM.model_copy(update={"attention_bias": True})
    ).eval()  # Qwen2 layout
    apply_lora(model, targets=["k_proj", "o_proj", "up_proj"], rank=2, alpha=5)
    _randomize_all_(model, seed=4)
    save_checkpoint(tmp_path / "ckpt", model)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", adapter_out=tmp_path / "adapter")
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "hf", attn_implementation="eager"
        )
        wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert_close(
            "peft qwen2 logits", wrapped(input_ids=IDS).logits, logits(model), HF_TOLERANCE
        )


def test_peft_export_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    from tessera.interop import export_hf

    model = LVLM(LVLMConfig(vision=TINY_VIT, llm=TINY_LLM, image_token_id=5))
    save_checkpoint(tmp_path / "plain", model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        export_hf(tmp_path / "plain", tmp_path / "out", adapter_out=tmp_path / "adapter")
    apply_lora(model, rank=2)  # the vision tower's q/v too
    save_checkpoint(tmp_path / "vision", model)
    with pytest.raises(ValueError, match="no PEFT export"):
        export_hf(tmp_path / "vision", tmp_path / "out", adapter_out=tmp_path / "adapter")
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()
