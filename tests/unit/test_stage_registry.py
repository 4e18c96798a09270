"""The stage registry (docs/architecture.md, "How to add a stage"): a stage that a module declares is found, run by
its config's type, given its presets, a CLI command made from its config's own fields and rows in the run report,
with nothing else changed."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

import pipeline.report.report as report
import pipeline.stages.registry as registry
from flows.cli import main
from pipeline.config import TrainingConfig, preset
from pipeline.engine.stage_cache import StageResult
from pipeline.stages.registry import StageSpec, run_stage, stage_specs


class EchoConfig(TrainingConfig):
    """A toy stage: what a new stage declares, and no more."""

    init_checkpoint: str = Field(description="the model it starts from")
    train_manifest: str = Field(description="labeled manifest")
    level: Literal[1, 2] = Field(1, description="how loud")
    loud: bool = Field(False, description="shout")

    @classmethod
    def presets(cls):
        """`tiny`: 7 updates."""
        return {"tiny": lambda init_checkpoint, train_manifest, **f: cls(
            init_checkpoint=init_checkpoint, train_manifest=train_manifest, **({"max_updates": 7} | f))}

    def stage_name(self) -> str:
        """Its folder."""
        return f"echo/{self.level}"


RAN: list[EchoConfig] = []


def run_echo(cfg: EchoConfig, run_dir: str, **kwargs) -> StageResult:
    """Record the config it ran with."""
    RAN.append(cfg)
    return StageResult(cfg.stage_name(), f"{run_dir}/{cfg.stage_name()}", "last.pt", "best.pt", cfg.max_updates,
                       "fp32", extra={"echo": cfg.level})


ECHO = StageSpec(EchoConfig, run_echo, "echo", "a toy stage", summary=lambda cfg, r: f"echoed {r.extra['echo']}",
                 report_title="↪ echoed")


@pytest.fixture
def with_echo(monkeypatch):
    specs = (*stage_specs(), ECHO)
    monkeypatch.setattr(registry, "stage_specs", lambda: specs)
    monkeypatch.setattr(report, "stage_specs", lambda: specs)
    RAN.clear()


def test_the_stages_of_pipeline_stages_are_found_once_each():
    assert {s.command: s.kind for s in stage_specs()} == {
        "train": "supervised", "finetune": "finetune", "slimipl": "slimipl", "student": "student",
        "prune": "prune", "quantize": "quantize"}
    with pytest.raises(TypeError, match="declare STAGE"):
        run_stage(EchoConfig(init_checkpoint="a.pt", train_manifest="t.jsonl"), "run")


def test_a_declared_stage_gets_its_preset_dispatch_cli_command_and_report_rows(with_echo, tmp_path, capsys):
    assert preset("echo", "tiny", "a.pt", "t.jsonl").max_updates == 7  # its own presets, no table entry
    assert run_stage(EchoConfig(init_checkpoint="a.pt", train_manifest="t.jsonl"), "run").step == 300000
    assert main(["echo", "--init", "a.pt", "--train", "t.jsonl", "--run-dir", str(tmp_path), "--level", "2",
                 "--loud", "--max-updates", "3"]) == 0
    cfg = RAN[-1]
    assert (cfg.init_checkpoint, cfg.level, cfg.loud, cfg.max_updates) == ("a.pt", 2, True, 3)
    assert "echoed 2" in capsys.readouterr().out
    main(["echo", "--init", "b.pt", "--train", "t.jsonl", "--run-dir", str(tmp_path)])
    assert (RAN[-1].level, RAN[-1].loud, RAN[-1].max_updates) == (1, False, 7)  # unset flags keep the preset's
    assert ("echo", "↪ echoed") in report.serving_stages()
    with pytest.raises(SystemExit):
        main(["echo", "--init", "a.pt", "--train", "t.jsonl", "--run-dir", str(tmp_path), "--level", "3"])
