"""The run directory (docs/architecture.md, "Data model"): the one place that knows where each stage writes.

```
<run>/supervised/            a stage folder: config.json, checkpoints/{last,best}.pt, metrics.jsonl,
<run>/finetune/<lang>/         dev_evals.json, rejects.jsonl, result.json (what the next stage reads)
<run>/slimipl/<lang>/          (+ pl_metrics.jsonl, checkpoints/good.pt)
<run>/student/<variant>/
<run>/labels/                the PL corpus (its own layout: storage.pl.LabelStore)
<run>/eval/<stage name>/     test scores of a stage's best model (metrics.json/.md, hypotheses.jsonl)
<run>/report/                report.{md,json}, dev_cer.png, recipe_run.json
```

A stage's name is its folder relative to the run ("finetune/sl"), as every training config says
(`cfg.stage_name()`), so a reader finds any result by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.checkpoint import read_checkpoint_fields
from storage.files import exists, join, list_files

# Per-language stages in the order of the recipe; a language's teacher is its latest stage that finished.
PER_LANGUAGE_STAGES = ("finetune", "slimipl")


@dataclass(frozen=True)
class StageDir:
    """One stage's folder and the files in it."""

    url: str

    def file(self, name: str) -> str:
        """A file of the stage folder."""
        return join(self.url, name)

    def checkpoint(self, name: str) -> str:
        """`checkpoints/<name>.pt`: last (the resume record), best (lowest dev CER), good (slimIPL's rollback)."""
        return join(self.url, "checkpoints", f"{name}.pt")

    @property
    def last(self) -> str:
        """The resume record."""
        return self.checkpoint("last")

    @property
    def best(self) -> str:
        """The model with the lowest dev CER (the last one without dev data)."""
        return self.checkpoint("best")

    @property
    def result(self) -> str:
        """result.json: the stage's summary, which the next stage and the stage cache read."""
        return self.file("result.json")

    @property
    def finished(self) -> bool:
        """Whether the stage wrote its result."""
        return exists(self.result)


@dataclass(frozen=True)
class RunLayout:
    """Where every stage of one run writes."""

    run_dir: str

    def stage(self, name: str) -> StageDir:
        """The folder of a stage by name: "supervised", "finetune/sl", "slimipl/sl", "student/<variant>"."""
        return StageDir(join(self.run_dir, name))

    @property
    def supervised(self) -> StageDir:
        """Stage 1's folder."""
        return self.stage("supervised")

    def finetune(self, language: str) -> StageDir:
        """Stage 2's folder for one language."""
        return self.stage(f"finetune/{language}")

    def slimipl(self, language: str) -> StageDir:
        """Stage 3's folder for one language."""
        return self.stage(f"slimipl/{language}")

    def student(self, variant: str) -> StageDir:
        """Stage 5's folder for one student."""
        return self.stage(f"student/{variant}")

    @property
    def labels(self) -> str:
        """The PL corpus of the run (step 4)."""
        return join(self.run_dir, "labels")

    def eval(self, name: str) -> str:
        """Where a stage's best model is scored on the test set."""
        return join(self.run_dir, "eval", name)

    @property
    def report(self) -> str:
        """The run report's folder."""
        return join(self.run_dir, "report")

    def finished(self, kind: str) -> dict[str | None, StageDir]:
        """The finished stages of a kind: {None: dir} for a pooled one ("supervised"), {language or variant: dir}
        for the others ("finetune", "slimipl", "student")."""
        pooled = self.stage(kind)
        if pooled.finished:
            return {None: pooled}
        found = list_files(join(self.run_dir, kind), "*/result.json")
        return {url.rsplit("/", 2)[-2]: self.stage(f"{kind}/{url.rsplit('/', 2)[-2]}") for url in found}

    def languages(self) -> list[str]:
        """The run's languages, from its multilingual checkpoint's record (no weights are read where the file is
        local).

        Raises:
            FileNotFoundError: when the run has no supervised checkpoint yet.
        """
        return list(read_checkpoint_fields(self.supervised.best, ["languages"])["languages"])

    def teacher(self, language: str) -> str:
        """A language's best model in the run: its slimIPL checkpoint, else its fine-tune, else the multilingual one.

        Raises:
            FileNotFoundError: when the run has none of them.
        """
        candidates = [self.stage(f"{kind}/{language}").best for kind in reversed(PER_LANGUAGE_STAGES)]
        candidates.append(self.supervised.best)
        found = next((c for c in candidates if exists(c)), None)
        if found is None:
            raise FileNotFoundError(f"no teacher for {language!r} in {self.run_dir}: none of {', '.join(candidates)} "
                                    "exists")
        return found


def teachers_for_run(run_dir: str, languages: list[str] | None = None) -> dict[str, str]:
    """Each language's best model in a run (all of the run's languages by default): language → checkpoint URL.

    Raises:
        FileNotFoundError: when the run has no model for a language.
    """
    layout = RunLayout(run_dir)
    return {lang: layout.teacher(lang) for lang in (layout.languages() if languages is None else languages)}
