"""Every preset validates; bad combinations fail early with the fix in the message."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models.encoder import CTCLIDModel, count_parameters
from pipeline.config import (
    MODEL_PRESET_PARAMS,
    PRESETS,
    ModelConfig,
    SupervisedConfig,
    deep_merge,
    model_kwargs,
    parse_assignments,
    preset,
    supervised_tiny,
)
from pipeline.engine.trainer import lr_at


def supervised_preset(name: str, *args, **fields) -> SupervisedConfig:
    return preset("supervised", name, *args, **fields)


@pytest.mark.parametrize("name", sorted(PRESETS["model"]))
def test_model_presets_validate(name):
    cfg = preset("model", name)
    assert cfg.d_model % cfg.n_heads == 0
    assert ModelConfig(**cfg.model_dump()) == cfg


def _preset_params(name: str) -> int:
    with torch.device("meta"):  # counts shapes without allocating a billion floats
        return count_parameters(CTCLIDModel(**model_kwargs(preset("model", name), 256, 6, 80)))


@pytest.mark.parametrize("name", sorted(PRESETS["model"]))
def test_every_model_preset_has_its_stated_parameter_count_within_2_percent(name):
    assert abs(_preset_params(name) / MODEL_PRESET_PARAMS[name] - 1) <= 0.02


def test_the_presets_that_results_were_measured_with_keep_their_exact_counts():
    # tiny: every result in docs/; base and large: the paper's shapes (they state 275 M and 1.06 B)
    assert {n: _preset_params(n) for n in ("tiny", "base", "large")} == {
        "tiny": 1_204_886, "base": 256_246_838, "large": 1_022_082_614}
    assert preset("model", "large").activation_checkpointing  # what lets it train on one GPU


def test_depth_width_and_conformer_variants_differ_where_they_say():
    tiny, deep, wide, conformer = (preset("model", n) for n in
                                   ("tiny", "tiny_deep_narrow", "tiny_wide_shallow", "tiny_conformer"))
    assert deep.n_layers > tiny.n_layers > wide.n_layers and deep.d_model < tiny.d_model < wide.d_model
    assert conformer.encoder == "conformer" and conformer.d_model == tiny.d_model
    with pytest.raises(ValidationError, match="must be odd"):
        ModelConfig(encoder="conformer", conformer_conv_kernel=8)


def test_capacity_options_at_their_defaults_leave_resume_keys_as_they_were():
    cfg = supervised_tiny("train.jsonl")
    assert cfg.resume_key() == "321bb0f3beb3051d"  # the key runs started before these options have
    checkpointed = cfg.model_copy(update={"model": cfg.model.model_copy(update={"activation_checkpointing": True})})
    assert checkpointed.resume_key() == cfg.resume_key()  # recomputes activations, computes the same update
    for change in ({"language_conditioning": True}, {"encoder": "conformer"}):
        other = cfg.model_copy(update={"model": cfg.model.model_copy(update=change)})
        assert other.resume_key() != cfg.resume_key()


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


def test_the_recipe_form_picks_the_model_preset_and_language_conditioning_for_every_stage():
    from pipeline.config import RecipeConfig

    form = dict(labeled_manifest="l.jsonl", unlabeled_manifest="u.jsonl", preset="tiny")
    default = RecipeConfig(**form).supervised_config().model
    assert default == preset("model", "tiny")
    chosen = RecipeConfig(**form, model_preset="tiny_conformer", language_conditioning=True,
                          supervised={"model": {"dropout": 0.2}}).supervised_config().model
    assert chosen.encoder == "conformer" and chosen.n_layers == 2 and chosen.language_conditioning
    assert chosen.dropout == preset("model", "tiny_conformer").dropout  # the preset knob wins over the overrides
    kept = RecipeConfig(**form, supervised={"model": {"dropout": 0.2}}).supervised_config().model
    assert kept.dropout == 0.2 and kept.d_model == 144
    with pytest.raises(ValidationError, match="model_preset"):
        RecipeConfig(**form, model_preset="huge")


def test_the_recipe_form_shrinks_the_final_student_with_the_serving_knobs():
    from pipeline.config import RecipeConfig

    form = dict(labeled_manifest="l.jsonl", unlabeled_manifest="u.jsonl", preset="tiny")
    cfg = RecipeConfig(**form, serving_prune=["pathways", "agnostic"], serving_mask_search="lth", serving_sparsity=0.5,
                       serving_bits=[2], prune={"round_updates": 7}, student_modes=["finetune", "from_scratch"],
                       rounds=2)
    assert cfg.final_student_stage() == "student/finetune-round2-labeled-ft"  # the first mode, last round, after ft
    pruned = cfg.prune_config("pathways", "s.pt")
    assert (pruned.method, pruned.mask_search, pruned.sparsity, pruned.round_updates) == ("pathways", "lth", 0.5, 7)
    assert pruned.init_checkpoint == "s.pt" and pruned.stage_name() == "prune/pathways-lth"
    assert cfg.quantize_config(2, "s.pt").stage_name() == "quantize/2bit"
    assert RecipeConfig(**form, student_labeled_finetune=False).final_student_stage() == "student/from_scratch"
    assert RecipeConfig(**form).serving_prune == [] and RecipeConfig(**form).serving_bits == []  # off by default
    with pytest.raises(ValidationError, match="final student"):
        RecipeConfig(**form, serving_bits=[1], student_modes=[])
    with pytest.raises(ValidationError, match="serving_bits"):
        RecipeConfig(**form, serving_bits=[3])


def test_a_labeled_data_budget_points_every_training_stage_and_lm_at_the_runs_share():
    from pipeline.config import RecipeConfig

    form = dict(labeled_manifest="c/l.jsonl", unlabeled_manifest="c/u.jsonl", dev_manifest="c/d.jsonl",
                preset="tiny", run_dir="r", labeling_lm="char",
                student_modes=["finetune", "from_scratch", "from_scratch_large"], serving_bits=[4])
    full, third = RecipeConfig(**form), RecipeConfig(**form, labeled_fraction=1 / 3)
    assert full.training_labeled_manifest == "c/l.jsonl"
    assert third.training_labeled_manifest == "r/manifests/labeled.jsonl"

    def train_manifests(cfg):
        stages = [cfg.supervised_config(), cfg.finetune_config("sl"), cfg.slimipl_config("sl"),
                  cfg.control_config(10), *cfg.serving_configs("s.pt")]
        stages += [cfg.student_config(m) for m in cfg.student_modes]
        stages += [cfg.labeled_finetune_config(m, "s.pt") for m in cfg.student_modes]
        return {s.train_manifest for s in stages} | {cfg.lm_config("sl", "t.pt").labeled_manifest}

    assert train_manifests(full) == {"c/l.jsonl"} and train_manifests(third) == {"r/manifests/labeled.jsonl"}
    assert third.slimipl_config("sl").unlabeled_manifest == "c/u.jsonl"  # the unlabeled audio stays whole
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="labeled_fraction"):
            RecipeConfig(**form, labeled_fraction=bad)
