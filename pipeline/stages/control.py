"""The same-compute control (docs/architecture.md, "Fair baselines"): stage 1's config trained on the labeled data
alone for as many updates as the best student's whole path (stage 1 + the student's own updates + its
labeled-only fine-tune). A student that beats the supervised base but not this control gained from compute, not
from pseudo-labels; "did self-training pay?" compares students with the better of the two.

The control is a run directory of its own, `<run>/control/<updates>/`, holding one supervised stage: the same
stage code, resume and stage cache as the base, and any number of controls side by side.
"""

from __future__ import annotations

import math

from pipeline.config import RecipeConfig
from pipeline.layout import RunLayout
from storage.files import read_json


def best_student(cfg: RecipeConfig) -> tuple[str, int]:
    """The last round's student whose model (the student or its labeled-only fine-tune, as the report chooses) has the
    lowest dev CER (the first mode without dev figures), and its whole path in updates.

    Raises:
        ValueError: when the recipe trains no student.
    """
    if not cfg.student_modes:
        raise ValueError("the same-compute control follows a student's path: the recipe trains none (student_modes)")
    layout = RunLayout(cfg.run_dir)

    def stage_cer(stage: str) -> float:
        try:
            metric = read_json(layout.stage(stage).result)["best"]["metric"]
        except FileNotFoundError:
            return math.inf
        return math.inf if metric is None else metric

    def dev_cer(mode: str) -> float:
        return min(stage_cer(cfg.student_config(mode, cfg.rounds).stage_name()),
                   stage_cer(cfg.final_student_stage(mode)))

    mode = min(cfg.student_modes, key=dev_cer)
    return cfg.final_student_stage(mode), cfg.path_updates(mode, cfg.rounds)
