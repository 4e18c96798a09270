"""Every preset validates; bad combinations fail early with the fix in the message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import PRESETS, ModelConfig, SupervisedConfig, deep_merge, parse_assignments, preset
from pipeline.engine.trainer import lr_at


def supervised_preset(name: str, *args, **fields) -> SupervisedConfig:
    return preset("supervised", name, *args, **fields)


@pytest.mark.parametrize("name", sorted(PRESETS["model"]))
def test_model_presets_validate(name):
    cfg = preset("model", name)
    assert cfg.d_model % cfg.n_heads == 0
    assert ModelConfig(**cfg.model_dump()) == cfg


@pytest.mark.parametrize("name", sorted(PRESETS["supervised"]))
def test_supervised_presets_validate(name):
    cfg = supervised_preset(name, "train.jsonl", "dev.jsonl")
    assert cfg.lid_weight == 1.0  # γ = 1, best in the paper
    assert SupervisedConfig(**cfg.model_dump()) == cfg
    assert cfg.config_hash() == SupervisedConfig(**cfg.model_dump()).config_hash()


def test_paper_defaults():
    cfg = supervised_preset("paper", "t.jsonl")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.ffn_dim) == (36, 768, 4, 3072)
    assert cfg.optim.name == "adagrad" and cfg.optim.lr == 0.03
    assert cfg.batch.max_batch_duration_s == 200.0
    assert cfg.specaugment.time_masks == 2


def test_unknown_fields_and_presets_are_refused():
    with pytest.raises(ValidationError):
        SupervisedConfig(train_manifest="t", lid_wieght=1.0)
    with pytest.raises(ValueError, match="choose one of"):
        preset("model", "huge")
    with pytest.raises(ValueError, match="choose one of"):
        preset("pruning", "tiny")
    with pytest.raises(ValueError, match="choose one of"):
        supervised_preset("fast", "t")


def test_impossible_configs_report_every_problem_at_once():
    with pytest.raises(ValidationError) as err:
        SupervisedConfig(
            train_manifest="t", max_updates=10, optim={"warmup_updates": 50},
            batch={"max_batch_duration_s": 5.0}, audio={"max_duration_s": 30.0},
        )
    text = str(err.value)
    assert "warmup_updates=50 exceeds max_updates=10" in text
    assert "max_batch_duration_s=5.0 is below" in text
    with pytest.raises(ValidationError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)


def test_lr_schedule_is_a_pure_function_of_the_step():
    optim = supervised_preset("tiny", "t").optim
    lrs = [lr_at(s, optim, 600) for s in range(600)]
    assert lrs[0] == pytest.approx(optim.lr / optim.warmup_updates)
    assert max(lrs) == pytest.approx(optim.lr)
    assert lrs[-1] == pytest.approx(optim.lr * optim.min_lr_ratio, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[optim.warmup_updates :], lrs[optim.warmup_updates + 1 :], strict=False))


def test_cli_overrides_reach_nested_fields():
    base = supervised_preset("tiny", "t").model_dump(mode="json")
    out = deep_merge(base, parse_assignments(["optim.lr=0.01", "model.n_layers=2", "tokenizer=sentencepiece"]))
    cfg = SupervisedConfig(**out)
    assert (cfg.optim.lr, cfg.model.n_layers, cfg.tokenizer) == (0.01, 2, "sentencepiece")
    assert cfg.optim.name == "adamw" and cfg.model.d_model == 144  # the rest of each section is kept
    with pytest.raises(ValueError, match="key=value"):
        parse_assignments(["optim.lr"])
