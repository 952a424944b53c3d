"""Zoo rows for LLaVA (linear connector) and LLaVA-1.5 (two-layer MLP): their tiny presets
(`tessera.presets.llava`, unchanged) run through the runner every LVLM preset shares, so they
are trained and measured exactly like MiniGPT-v2, Qwen-VL and InternVL."""

from __future__ import annotations

from tessera.presets.base import from_llava
from tessera.presets.llava import get_preset
from tessera.presets.lvlm_runner import zoo_runner

ZOO = {
    "llava": zoo_runner(lambda: from_llava(get_preset("llava-tiny"))),
    "llava-1.5": zoo_runner(lambda: from_llava(get_preset("llava-1.5-tiny"))),
}
