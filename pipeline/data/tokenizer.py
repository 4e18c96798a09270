"""One output vocabulary across all languages (paper Sec. 4: characters incl. punctuation and space).

`CharTokenizer` is the paper's choice; `SentencePieceTokenizer` (unigram, character_coverage 1.0) is the
alternative. CTC blank is id 0 in both; both serialize to a plain dict that JSON and checkpoints hold.
"""

from __future__ import annotations

import base64
import io
import unicodedata
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol

BLANK = "<blank>"
UNK = "<unk>"
UNK_TEXT = "\u2047"  # "⁇": what an unknown symbol decodes to; punctuation, so scoring ignores it


def prepare_text(text: str) -> str:
    """The form of a transcript the tokenizers see: NFC, single spaces, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class Tokenizer(Protocol):
    """What the pipeline needs of a tokenizer."""

    blank_id: int
    symbols: list[str]  # output symbols by id
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """Characters seen in the labeled transcripts, plus blank (0) and unk (1)."""

    blank_id = 0
    unk_id = 1

    def __init__(self, symbols: list[str]):
        if symbols[:2] != [BLANK, UNK]:
            raise ValueError("a character vocabulary starts with <blank>, <unk>")
        self.symbols = list(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols)

    @classmethod
    def train(cls, texts: Iterable[str], min_count: int = 1) -> CharTokenizer:
        """Vocabulary of every character seen at least `min_count` times, sorted for stability."""
        counts = Counter(ch for t in texts for ch in prepare_text(t))
        chars = sorted(ch for ch, n in counts.items() if n >= min_count)
        return cls([BLANK, UNK, *chars])

    def encode(self, text: str) -> list[int]:
        """Character ids of a transcript; unseen characters map to unk."""
        return [self._index.get(ch, self.unk_id) for ch in prepare_text(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a token id sequence (blank dropped, unk as '⁇')."""
        out = []
        for i in ids:
            if i == self.blank_id:
                continue
            out.append(UNK_TEXT if i == self.unk_id else self.symbols[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        """Serializable form."""
        return {"kind": "char", "symbols": self.symbols}


class SentencePieceTokenizer:
    """Unigram sentencepiece pieces shifted by one so that id 0 stays the CTC blank."""

    blank_id = 0

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size() + 1

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 256) -> SentencePieceTokenizer:
        """Train a unigram model with full character coverage (every script in the corpus kept)."""
        import sentencepiece as spm

        prepared = [prepare_text(t) for t in texts]
        # Full character coverage needs a piece per character (+ <unk>, <s>, </s>, ▁) at the least.
        min_size = len({ch for t in prepared for ch in t}) + 4
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(prepared),
            model_writer=buf,
            vocab_size=max(vocab_size, min_size),
            normalization_rule_name="identity",  # keep case, punctuation and NFC text exactly as labeled
            model_type="unigram",
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        return cls(buf.getvalue())

    @property
    def symbols(self) -> list[str]:
        """Output symbols by id: the blank, then the pieces."""
        return [BLANK, *(self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))]

    def encode(self, text: str) -> list[int]:
        """Piece ids (+1) of a transcript."""
        return [i + 1 for i in self._sp.encode(prepare_text(text))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a piece id sequence (blank dropped)."""
        return self._sp.decode([i - 1 for i in ids if i != self.blank_id])

    def to_dict(self) -> dict[str, Any]:
        """Serializable form (model bytes as base64)."""
        return {"kind": "sentencepiece", "model_b64": base64.b64encode(self.model_proto).decode("ascii")}


def train_tokenizer(kind: str, texts: list[str], sentencepiece_vocab_size: int = 256) -> Tokenizer:
    """Build the shared vocabulary from labeled transcripts.

    Raises:
        ValueError: for an unknown kind or no transcripts.
    """
    if not texts:
        raise ValueError("cannot build a tokenizer: no labeled transcripts survived validation")
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, sentencepiece_vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; choose 'char' or 'sentencepiece'")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from `to_dict()` output.

    Raises:
        ValueError: for an unknown kind.
    """
    if d.get("kind") == "char":
        return CharTokenizer(list(d["symbols"]))
    if d.get("kind") == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(d["model_b64"]))
    raise ValueError(f"unknown tokenizer kind {d.get('kind')!r}")
