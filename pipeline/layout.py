"""The corpus folder and the run directory (docs/architecture.md, "Data model"): the one place that knows where a
corpus keeps its splits and where each stage writes.

Where a corpus built by `mlpl corpus build` keeps its files: one manifest per split under `manifests/`, and the
hidden truth of the unlabeled clips under `hidden/` (PL CER only, never training), and the text-only split under
`text/` (sentences no clip speaks: LM text).

The run directory:

```
<run>/supervised/            a stage folder: config.json, checkpoints/{last,best}.pt, metrics.jsonl,
<run>/finetune/<lang>/         dev_evals.json, rejects.jsonl, result.json (what the next stage reads)
<run>/slimipl/<lang>/          (+ pl_metrics.jsonl, checkpoints/good.pt)
<run>/student/<variant>/       (any stage with average_top_n ≥ 2: + checkpoints/top/*.pt, checkpoints/averaged.pt)
<run>/labels/                the PL corpus (its own layout: storage.pl.LabelStore)
<run>/rounds/<k>/labels/     round k ≥ 2's PL corpus, labeled by round k-1's student
<run>/eval/<stage name>/     test scores of a stage's best model (metrics.json/.md, hypotheses.jsonl)
<run>/eval/<stage name>/<test set>/   its scores on another test set (e.g. ood_short, ood_long: out of domain)
<run>/control/<updates>/     the same-compute control: a run directory holding stage 1's config trained on
                               labeled data alone for that many updates (its supervised/ and eval/)
<run>/report/                report.{md,json}, dev_cer.png, recipe_run.json
```

A stage's name is its folder relative to the run ("finetune/sl"), as every training config says
(`cfg.stage_name()`), so a reader finds any result by name. A stage's teacher is its best.pt, or its averaged.pt
(the mean of its top-N dev-scored checkpoints) when that scored no worse on dev (`StageDir.teacher`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from storage.checkpoint import read_checkpoint_fields
from storage.files import StorageLock, exists, join, list_files

# Per-language stages in the order of the recipe; a language's teacher is its latest stage that finished.
PER_LANGUAGE_STAGES = ("finetune", "slimipl")

log = logging.getLogger("mlpl.layout")


def prefers_averaged(averaged_cer: float, best_cer: float) -> bool:
    """The one teacher rule: the averaged model teaches when its dev CER is not worse than best.pt's."""
    return averaged_cer <= best_cer


def teacher_note(averaged_cer: float, best_cer: float) -> str:
    """The line a stage and a labeling run record about the teacher: which model, and both dev CERs."""
    if prefers_averaged(averaged_cer, best_cer):
        return f"teacher: averaged (dev CER {averaged_cer:.2f}) vs best ({best_cer:.2f})"
    return f"teacher: best (dev CER {best_cer:.2f}) vs averaged ({averaged_cer:.2f})"


@dataclass(frozen=True)
class TeacherChoice:
    """Which checkpoint of a stage teaches, and the dev CERs it was chosen on (None without an averaged.pt)."""

    url: str
    kind: str  # "best" or "averaged"
    averaged_cer: float | None = None
    best_cer: float | None = None

    @property
    def note(self) -> str:
        """"teacher: averaged (dev CER x) vs best (y)", or just "teacher: best" when nothing was averaged."""
        if self.averaged_cer is None or self.best_cer is None:
            return f"teacher: {self.kind}"
        return teacher_note(self.averaged_cer, self.best_cer)


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
    def averaged(self) -> str:
        """The mean of the stage's top-N dev-scored checkpoints (with `average_top_n` ≥ 2)."""
        return self.checkpoint("averaged")

    @property
    def top_dir(self) -> str:
        """Where the weights of the top-N dev evaluations are kept until the stage averages them."""
        return join(self.url, "checkpoints", "top")

    def top(self, step: int) -> str:
        """One top-N member: the weights at a dev-evaluated update."""
        return join(self.top_dir, f"step{step:08d}.pt")

    def teacher(self) -> TeacherChoice:
        """best.pt, or averaged.pt when it exists and its recorded dev CER is not worse than best.pt's (only then
        are the two records read; no weights are read where the files are local).

        Raises:
            FileNotFoundError: when averaged.pt exists but best.pt does not.
            ValueError: when either is not an mlpl checkpoint.
        """
        if not exists(self.averaged):
            return TeacherChoice(self.best, "best")
        averaged_cer = float(read_checkpoint_fields(self.averaged, ["average"])["average"]["dev_cer"])
        best_cer = float(read_checkpoint_fields(self.best, ["best"])["best"]["metric"])
        kind = "averaged" if prefers_averaged(averaged_cer, best_cer) else "best"
        return TeacherChoice(self.averaged if kind == "averaged" else self.best, kind, averaged_cer, best_cer)

    @property
    def result(self) -> str:
        """result.json: the stage's summary, which the next stage and the stage cache read."""
        return self.file("result.json")

    @property
    def finished(self) -> bool:
        """Whether the stage wrote its result."""
        return exists(self.result)


@dataclass(frozen=True)
class StudentVariant:
    """Which of a run's students a folder `student/<folder>` holds: its mode (a row of the paper's Table 3:
    finetune, from_scratch, from_scratch_large; or a study's own name), its round, and whether it is that
    student's labeled-only fine-tune. Folder names are made here and only here, and read back by matching."""

    mode: str
    round: int = 1
    labeled_ft: bool = False

    @property
    def folder(self) -> str:
        """`<mode>`, `<mode>-round<k>` from round 2, `-labeled-ft` after either for the labeled-only fine-tune."""
        name = self.mode if self.round == 1 else f"{self.mode}-round{self.round}"
        return f"{name}-labeled-ft" if self.labeled_ft else name

    @property
    def student(self) -> StudentVariant:
        """The student itself: what a labeled-only fine-tune starts from (itself when it is one)."""
        return replace(self, labeled_ft=False)

    def labeled_finetune(self) -> StudentVariant:
        """Its labeled-only fine-tune."""
        return replace(self, labeled_ft=True)


def variants_of(folders: Iterable[str], modes: Sequence[str]) -> dict[str, StudentVariant]:
    """The variant each student folder holds, matched against every variant of `modes` (each round up to the
    number of folders, with and without the labeled-only fine-tune); a folder none matches is a study's own
    student of that name."""
    folders = list(folders)
    known = {v.folder: v for m in modes for r in range(1, len(folders) + 1)
             for v in (StudentVariant(m, r), StudentVariant(m, r, True))}
    return {f: known.get(f, StudentVariant(f)) for f in folders}


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
    def labeled_subset(self) -> str:
        """The run's labeled manifest when the recipe trains on a share of the labeled rows (`labeled_fraction`)."""
        return join(self.run_dir, "manifests", "labeled.jsonl")

    @property
    def labels(self) -> str:
        """The PL corpus of the run (step 4)."""
        return join(self.run_dir, "labels")

    def recipe_lock(self, wait_s: float = 0.0) -> StorageLock:
        """The lock a recipe holds on its run folder while it runs: a second recipe on the same folder waits up to
        `wait_s`, then is refused with who holds it (two recipes would train the same stages into one folder)."""
        return StorageLock(join(self.run_dir, "recipe.lock"), wait_s=wait_s,
                           busy=f"another recipe is running in {self.run_dir}: wait for it to finish (or stop it; "
                                "a stopped recipe's rerun resumes), or give this one another run folder")

    def round_labels(self, round_: int) -> str:
        """The PL corpus of a round: step 4's for round 1, else the one round k-1's student labeled."""
        return self.labels if round_ == 1 else join(self.run_dir, "rounds", str(round_), "labels")

    def eval(self, name: str, test_set: str | None = None) -> str:
        """Where a stage's best model is scored on the test set (or on another named test set)."""
        return join(self.run_dir, "eval", name) if test_set is None else join(self.run_dir, "eval", name, test_set)

    def control(self, updates: int) -> RunLayout:
        """The run directory of the same-compute control trained for `updates` updates."""
        return RunLayout(join(self.run_dir, "control", str(updates)))

    def controls(self) -> dict[int, RunLayout]:
        """The finished controls of the run by their updates."""
        found = list_files(join(self.run_dir, "control"), "*/supervised/result.json")
        names = [url.rsplit("/", 3)[-3] for url in found]
        return {int(name): self.control(int(name)) for name in names if name.isdigit()}

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

    def teacher_choice(self, language: str) -> TeacherChoice:
        """A language's best model in the run and why: its slimIPL stage, else its fine-tune, else the multilingual
        one (the first with a best.pt), and within it best.pt or averaged.pt (`StageDir.teacher`).

        Raises:
            FileNotFoundError: when the run has none of them.
        """
        stages = [self.stage(f"{kind}/{language}") for kind in reversed(PER_LANGUAGE_STAGES)] + [self.supervised]
        found = next((s for s in stages if exists(s.best)), None)
        if found is None:
            raise FileNotFoundError(f"no teacher for {language!r} in {self.run_dir}: none of "
                                    f"{', '.join(s.best for s in stages)} exists")
        return found.teacher()

    def teacher(self, language: str) -> str:
        """A language's teacher checkpoint (`teacher_choice`'s URL).

        Raises:
            FileNotFoundError: when the run has no model for the language.
        """
        return self.teacher_choice(language).url


def teacher_choices_for_run(run_dir: str, languages: list[str] | None = None) -> dict[str, TeacherChoice]:
    """Each language's teacher in a run and why (all of the run's languages by default).

    Raises:
        FileNotFoundError: when the run has no model for a language.
    """
    layout = RunLayout(run_dir)
    return {lang: layout.teacher_choice(lang) for lang in (layout.languages() if languages is None else languages)}


def teachers_for_run(run_dir: str, languages: list[str] | None = None) -> dict[str, str]:
    """Each language's best model in a run (all of the run's languages by default): language → checkpoint URL.

    Raises:
        FileNotFoundError: when the run has no model for a language.
    """
    choices = teacher_choices_for_run(run_dir, languages)
    for lang, choice in choices.items():
        if choice.averaged_cer is not None:
            log.info("%s %s (%s)", lang, choice.note, choice.url)
    return {lang: choice.url for lang, choice in choices.items()}


# --- the corpus folder -------------------------------------------------------------------------------------------

SPLITS = ("labeled", "unlabeled", "dev", "test", "ood_short", "ood_long")
# The out-of-domain test (the role of LibriSpeech in the paper): other text, other voices, short and long clips; scored
# for every model, never trained or tuned on.
OOD_SPLITS = ("ood_short", "ood_long")


def split_manifest(corpus_dir: str, split: str) -> str:
    """The manifest of one split: labeled, unlabeled, dev, test, ood_short or ood_long."""
    return join(corpus_dir, "manifests", f"{split}.jsonl")


def hidden_file(corpus_dir: str, name: str) -> str:
    """A file of the hidden truth: unlabeled_reference.jsonl (the unlabeled clips' transcripts), channel.jsonl."""
    return join(corpus_dir, "hidden", name)


def text_only_file(corpus_dir: str, language: str) -> str:
    """The text-only split of a language: sentences used by no clip, one per line (LM text, never audio)."""
    return join(corpus_dir, "text", f"{language}.txt")


def import_record(corpus_dir: str) -> str:
    """Where `mlpl import` says what it imported; its presence marks an imported corpus (nothing to build)."""
    return join(corpus_dir, "import.json")


def is_imported(corpus_dir: str) -> bool:
    """Whether the folder is a corpus `mlpl import` wrote (not a synthetic one to build)."""
    return exists(import_record(corpus_dir))


def corpus_data(corpus_dir: str, run_dir: str) -> dict[str, str]:
    """The data fields of a `RecipeConfig` for a corpus folder. A synthetic corpus has every split, the hidden
    references and LM text (they may not be built yet); an imported one has the splits its source had, and
    only those it has are named (the source's text-only sentences may be added under text/<lang>.txt)."""
    fields = dict(run_dir=run_dir, labeled_manifest=split_manifest(corpus_dir, "labeled"),
                  dev_manifest=split_manifest(corpus_dir, "dev"), test_manifest=split_manifest(corpus_dir, "test"),
                  unlabeled_manifest=split_manifest(corpus_dir, "unlabeled"),
                  reference_manifest=hidden_file(corpus_dir, "unlabeled_reference.jsonl"),
                  lm_text_dir=join(corpus_dir, "text"),
                  extra_test_manifests={split: split_manifest(corpus_dir, split) for split in OOD_SPLITS})
    if not is_imported(corpus_dir):
        return fields
    required = ("run_dir", "labeled_manifest", "unlabeled_manifest")
    fields["extra_test_manifests"] = {k: v for k, v in fields["extra_test_manifests"].items() if exists(v)}
    return {k: v for k, v in fields.items() if k in required or k == "extra_test_manifests" or exists(v)}
