"""`tessera zoo`: data prepared once and reused, one results.json per preset with the machine,
minutes, seed and scale, a failing preset recorded while the others run, unknown names refused
with the list, the Markdown table, the CLI; and a real smoke run of the CLIP preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessera.cli import app
from tessera.data.shapes import ShapesConfig
from tessera.zoo import runner as zoo_runner
from tessera.zoo.core import SPLITS, PresetDiscovery, ZooContext, ZooResult
from tessera.zoo.runner import DataStep, ZooDataConfig, prepare_zoo_data, run_zoo
from tessera.zoo.table import render_zoo_table

TINY = ZooDataConfig(shapes=ShapesConfig(seed=0, num_train=24, num_val=2, num_test=10, num_test_comp=10))
ID, COMP = SPLITS["test"], SPLITS["test_comp"]


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_zoo_data(tmp_path_factory.mktemp("zoo") / "data", TINY, progress=False)


def fake_result(value: float) -> ZooResult:
    return ZooResult(
        metrics={ID: {"zeroshot_top1": value, "zeroshot_shape_top1": 1.0}, COMP: {"zeroshot_top1": value / 2}},
        baselines={ID: {"zeroshot_top1": 0.2, "zeroshot_shape_top1": 0.2}, COMP: {"zeroshot_top1": 0.25}},
        trainable_params_by_stage={"pretrain": 1_500_000, "finetune": 2_000},
        seconds_by_stage={"pretrain": 1.0},
        visual_tokens_per_image=64,
    )


@pytest.fixture
def fake_presets(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[ZooContext]]:
    calls: dict[str, list[ZooContext]] = {"good": [], "boom": []}

    def good(ctx: ZooContext) -> ZooResult:
        calls["good"].append(ctx)
        return fake_result(0.8)

    def boom(ctx: ZooContext) -> ZooResult:
        calls["boom"].append(ctx)
        raise RuntimeError("exploded on purpose")

    monkeypatch.setattr(zoo_runner, "find_presets", lambda: PresetDiscovery({"boom": boom, "good": good}, {}))
    return calls


# --- data --------------------------------------------------------------------------------------------


def test_data_is_made_once_and_extended_step_by_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = prepare_zoo_data(tmp_path / "data", TINY, progress=False)
    for name in ("meta.json", "classic_tasks.json", "test/retrieval.json", "test_comp/zeroshot.json"):
        assert (root / name).is_file(), name
    meta_time = (root / "meta.json").stat().st_mtime_ns
    prepare_zoo_data(root, TINY, progress=False)
    assert (root / "meta.json").stat().st_mtime_ns == meta_time  # reused

    made: list[Path] = []
    steps = [s.key for s in zoo_runner.DATA_STEPS]
    assert steps[:2] == ["shapes", "classic_tasks"]
    monkeypatch.setattr(zoo_runner, "DATA_STEPS", [*zoo_runner.DATA_STEPS,
                                                   DataStep("extra", lambda r, c, p: made.append(r))])
    prepare_zoo_data(root, TINY, progress=False)
    assert made == [root] and (root / "meta.json").stat().st_mtime_ns == meta_time  # only the new step ran
    assert json.loads((root / "zoo_data.json").read_text())["steps"] == [*steps, "extra"]
    # a step that now writes more (version raised) runs again, alone
    monkeypatch.setattr(zoo_runner, "DATA_STEPS", [*zoo_runner.DATA_STEPS[:-1],
                                                   DataStep("extra", lambda r, c, p: made.append(r), version=2)])
    prepare_zoo_data(root, TINY, progress=False)
    assert made == [root, root] and (root / "meta.json").stat().st_mtime_ns == meta_time
    assert json.loads((root / "zoo_data.json").read_text())["steps"] == [*steps, "extra@2"]

    other = TINY.model_copy(update={"shapes": TINY.shapes.model_copy(update={"num_test": 8})})
    prepare_zoo_data(root, other, progress=False)  # another config: everything again
    assert (root / "meta.json").stat().st_mtime_ns != meta_time and len(made) == 3
    assert json.loads((root / "meta.json").read_text())["splits"]["test"]["images"] == 8


# --- the runner ------------------------------------------------------------------------------------------


def test_failing_preset_is_recorded_and_the_others_run(
    zoo_data: Path, tmp_path: Path, fake_presets: dict[str, list[ZooContext]]
) -> None:
    run = run_zoo(["boom", "good"], tmp_path, scale=0.5, seed=3, data_dir=zoo_data, progress=False, log=None)
    assert run.failed == ["boom"]
    (ctx,) = fake_presets["good"]
    assert (ctx.data_dir, ctx.out_dir, ctx.seed, ctx.scale) == (zoo_data, tmp_path / "good", 3, 0.5)

    failed = json.loads((tmp_path / "boom" / "results.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: exploded on purpose"
    assert "exploded on purpose" in failed["traceback"]

    good = json.loads((tmp_path / "good" / "results.json").read_text())
    assert good["status"] == "ok" and good["metrics"][ID]["zeroshot_top1"] == 0.8
    assert good["seed"] == 3 and good["scale"] == 0.5 and good["minutes"] >= 0
    assert set(good["machine"]) >= {"cpu", "cores", "torch", "threads"}
    assert good["command"] == f"tessera zoo --only boom --only good --out {tmp_path} --scale 0.5 --seed 3 --data {zoo_data}"

    table = (tmp_path / "ZOO.md").read_text()
    assert "| good | 0.800 (0.200) | 0.400 (0.250) | 64 | pretrain 1.50M; finetune 2.0K |" in table
    assert "| boom (failed) | – | – |" in table
    assert "- boom: RuntimeError: exploded on purpose" in table
    assert good["command"] in table and good["machine"]["cpu"] in table


def test_unknown_names_are_refused_with_the_list(tmp_path: Path, fake_presets: dict[str, list[ZooContext]]) -> None:
    with pytest.raises(ValueError, match=r"unknown zoo preset\(s\) \['nope'\]; available: \['boom', 'good'\]"):
        run_zoo(["good", "nope"], tmp_path, progress=False, log=None)
    assert not fake_presets["good"]  # nothing ran
    with pytest.raises(ValueError, match="scale must be positive"):
        run_zoo(["good"], tmp_path, scale=0.0, progress=False, log=None)


def test_a_broken_preset_module_is_named_and_does_not_stop_the_others(
    zoo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = PresetDiscovery({"good": lambda ctx: fake_result(0.8)},
                            {"tessera.presets.wip": "ImportError: cannot import name 'x'"})
    monkeypatch.setattr(zoo_runner, "find_presets", lambda: found)
    with pytest.raises(ValueError, match=r"available: \['good'\]; preset modules that failed to import: "
                                         r"tessera.presets.wip \(ImportError: cannot import name 'x'\)"):
        run_zoo(["wip"], tmp_path, progress=False, log=None)
    logged: list[str] = []
    assert run_zoo(["good"], tmp_path, data_dir=zoo_data, progress=False, log=logged.append).failed == []
    assert any("tessera.presets.wip" in line for line in logged)


def test_given_data_folder_must_hold_the_task_files(tmp_path: Path, fake_presets: dict[str, list[ZooContext]]) -> None:
    with pytest.raises((FileNotFoundError, ValueError)):
        run_zoo(["good"], tmp_path / "out", data_dir=tmp_path / "empty", progress=False, log=None)


def test_table_rows_from_earlier_runs_are_kept(
    zoo_data: Path, tmp_path: Path, fake_presets: dict[str, list[ZooContext]]
) -> None:
    run_zoo(["good"], tmp_path, data_dir=zoo_data, progress=False, log=None)
    run_zoo(["boom"], tmp_path, data_dir=zoo_data, progress=False, log=None)
    table = (tmp_path / "ZOO.md").read_text()
    assert "| good |" in table and "| boom (failed) |" in table
    assert table.index("| boom (failed) |") < table.index("| good |")  # discovery order
    assert "these commands" in table


# --- the table -----------------------------------------------------------------------------------------------


def test_table_layout() -> None:
    row = {"name": "x", "status": "ok", **fake_result(0.5).to_json(), "minutes": 2.25,
           "machine": {"cpu": "CPU Z", "cores": 2, "torch": "2.x", "threads": 2}, "command": "tessera zoo --only x"}
    row["metrics"][ID]["ocr_cer"] = 0.1
    row["baselines"][ID]["ocr_cer"] = 0.9
    row["metrics"][ID]["retrieval_i2t_r5"] = 0.9
    table = render_zoo_table([row])
    header = next(line for line in table.splitlines() if line.startswith("| preset"))
    assert header == ("| preset | zeroshot_top1 ID | zeroshot_top1 comp | ocr_cer ID | ocr_cer comp "
                      "| visual tokens / image | trainable params by stage | minutes |")
    assert "| x | 0.500 (0.200) | 0.250 (0.250) | 0.100 (0.900) | – | 64 | pretrain 1.50M; finetune 2.0K | 2.2 |" in table
    assert "Machine: CPU Z, 2 cores, torch 2.x, 2 threads." in table
    assert "    tessera zoo --only x" in table and "Lower is better for ocr_cer" in table


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli(tmp_path: Path, zoo_data: Path, fake_presets: dict[str, list[ZooContext]]) -> None:
    cli = CliRunner()
    listed = cli.invoke(app, ["zoo", "--list"])
    assert listed.exit_code == 0 and listed.output.split() == ["boom", "good"]
    unknown = cli.invoke(app, ["zoo", "--only", "nope", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "available: ['boom', 'good']" in unknown.output
    ok = cli.invoke(app, ["zoo", "--only", "good", "--out", str(tmp_path), "--data", str(zoo_data), "--scale", "0.1",
                          "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    result = json.loads((tmp_path / "good" / "results.json").read_text())
    assert result["scale"] == 0.1 and result["machine"]["threads"] == 1
    assert result["command"].endswith("--scale 0.1 --data " + str(zoo_data) + " --threads 1")
    assert cli.invoke(app, ["zoo", "--only", "good", "--out", str(tmp_path), "--threads", "0"]).exit_code == 2
    both = cli.invoke(app, ["zoo", "--only", "good,boom", "--out", str(tmp_path), "--data", str(zoo_data)])
    assert both.exit_code == 2 and "failed presets: boom" in both.output
    assert [c.out_dir.name for c in fake_presets["good"]] == ["good", "good"]


# --- a real preset, end to end ------------------------------------------------------------------------------------


def test_smoke_run_of_the_clip_preset(zoo_data: Path, tmp_path: Path) -> None:
    run = run_zoo(["clip"], tmp_path, scale=0.004, data_dir=zoo_data, progress=False, log=None)
    assert run.failed == [], run.results["clip"].get("traceback")
    result = json.loads((tmp_path / "clip" / "results.json").read_text())
    assert set(result) >= {"status", "metrics", "baselines", "trainable_params_by_stage", "seconds_by_stage",
                           "visual_tokens_per_image", "notes", "minutes", "machine", "seed", "scale"}
    for label in (ID, COMP):
        assert {"retrieval_i2t_r1", "retrieval_t2i_r1", "zeroshot_top1"} <= set(result["metrics"][label])
        assert set(result["metrics"][label]) == set(result["baselines"][label])
    assert result["notes"]["steps_by_stage"] == {"clip": 6}  # 1,500 steps × 0.004
    assert "| clip | " in (tmp_path / "ZOO.md").read_text()


def test_the_zoo_refuses_to_run_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one process"):
        run_zoo(["clip"], tmp_path, progress=False, log=None)
    assert not any(tmp_path.iterdir())  # nothing written
