"""Where a corpus built by `mlpl corpus build` keeps its files: one manifest per split under `manifests/`, and the
hidden truth of the unlabeled clips under `hidden/` (PL CER only, never training), and the text-only split under
`text/` (sentences no clip speaks: LM text)."""

from __future__ import annotations

from storage.files import exists, join

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
