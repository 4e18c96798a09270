"""Typed configs (docs/architecture.md, "Configs"): `base` (what every stage shares), `stages` (one config per
stage), `presets` (paper and tiny), `recipe` (the forms operators fill). Everything public is importable from
here: `from pipeline.config import RecipeConfig, preset`.
"""

from pipeline.config.base import (
    MODEL_PRESET_PARAMS,
    AudioPolicy,
    BatchConfig,
    Config,
    FeatureConfig,
    LanguageMix,
    ModelConfig,
    OptimConfig,
    PLFilter,
    SpecAugmentConfig,
    TrainingConfig,
    deep_merge,
    labeling_audio_policy,
    model_kwargs,
    normalize_language,
    parse_assignments,
    tiny_specaugment,
)
from pipeline.config.presets import (
    PRESETS,
    configured,
    finetune_paper,
    finetune_tiny,
    label_paper,
    label_tiny,
    preset,
    slimipl_paper,
    slimipl_tiny,
    student_paper,
    student_tiny,
    supervised_paper,
    supervised_tiny,
)
from pipeline.config.recipe import (
    AUDIO_EXTENSIONS,
    RECIPE_PRESETS,
    RecipeConfig,
    RelabelConfig,
    corpus_data,
    read_form,
    recipe_bench,
    recipe_demo,
    recipe_preset,
)
from pipeline.config.stages import (
    CollapseGuardConfig,
    FinetuneConfig,
    LabelConfig,
    SlimIPLConfig,
    StudentConfig,
    SupervisedConfig,
)

__all__ = [
    "AUDIO_EXTENSIONS", "MODEL_PRESET_PARAMS", "AudioPolicy", "BatchConfig", "CollapseGuardConfig", "Config",
    "FeatureConfig", "FinetuneConfig", "LabelConfig", "LanguageMix", "ModelConfig", "OptimConfig", "PLFilter",
    "PRESETS",
    "RECIPE_PRESETS", "RecipeConfig", "RelabelConfig", "SlimIPLConfig", "SpecAugmentConfig", "StudentConfig",
    "SupervisedConfig", "TrainingConfig", "configured", "corpus_data", "deep_merge", "finetune_paper", "finetune_tiny",
    "label_paper", "label_tiny", "labeling_audio_policy", "model_kwargs", "normalize_language", "parse_assignments",
    "preset", "read_form", "recipe_bench", "recipe_demo", "recipe_preset", "slimipl_paper", "slimipl_tiny",
    "student_paper", "student_tiny", "supervised_paper", "supervised_tiny", "tiny_specaugment",
]
