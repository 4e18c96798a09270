"""CTC beam search fused with an n-gram LM (torchaudio's `ctc_decoder` over flashlight-text), and the LM's
vocabulary files that make it agree with our tokenizer. See docs/architecture.md, "LM-fused labeling".

Pitfalls this module exists for (DESIGN.md, environment facts): lexicon-free, torchaudio builds the LM's word
dictionary in hash order unless `lm_dict` lists the tokens in vocabulary order (then LM weight 0 is exactly
greedy); ARPA words are whitespace-separated, so the space character becomes the sil token `|`; the blank must
have a name that is not a character.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from pipeline.config.decoding import BeamDecoderConfig, LMUnit
from pipeline.data.tokenizer import BLANK, UNK, CharTokenizer, Tokenizer, prepare_text

SIL_CANDIDATES = ("|", "▁", "<sil>")
# An LM folder (meta.json marks it complete): the ARPA to read and reuse, KenLM's binary of it to load fast.
LM_FILES = ("lm.arpa", "lm.bin", "tokens.txt", "lm_dict.txt", "lexicon.txt")
FLASHLIGHT_FIX = "pip install flashlight-text==0.0.7 (wheels for CPython 3.11 and 3.12)"
LMPLZ_FIX = "run `make install` (it builds build/kenlm/bin/lmplz) or set MLPL_LMPLZ to a KenLM lmplz binary"


def sil_token(tokenizer: CharTokenizer) -> str:
    """The LM's name for the space character: the first candidate that is not itself a character."""
    return next(s for s in SIL_CANDIDATES if s not in tokenizer.symbols)


def lm_tokens(tokenizer: Tokenizer) -> list[str]:
    """The decoder's token names in vocabulary order: the space is the sil token, blank and unk keep their names.

    Raises:
        ValueError: for a tokenizer that is not character-level (an LM over pieces is not built here).
    """
    if not isinstance(tokenizer, CharTokenizer):
        raise ValueError("LM-fused decoding needs a character tokenizer (the paper's); this checkpoint has "
                         f"{type(tokenizer).__name__}")
    sil = sil_token(tokenizer)
    return [sil if s == " " else s for s in tokenizer.symbols]


def lm_sentences(texts: Iterable[str], tokenizer: Tokenizer, unit: LMUnit) -> tuple[list[str], int]:
    """The LM's training lines (char: characters separated by spaces, word boundaries as the sil token; word:
    the words) and how many sentences were dropped for a character the vocabulary lacks."""
    lm_tokens(tokenizer)  # a character tokenizer, or the error that says why not
    known, sil = set(tokenizer.symbols[2:]), sil_token(tokenizer)
    lines, dropped = [], 0
    for text in texts:
        text = prepare_text(text)
        if not text:
            continue
        if any(c not in known and c != " " for c in text):
            dropped += 1
            continue
        lines.append(" ".join(sil if c == " " else c for c in text) if unit == "char" else text)
    return lines, dropped


def lexicon_lines(lines: Iterable[str], tokenizer: Tokenizer) -> list[str]:
    """A word LM's lexicon: each word of the text spelled in characters. No trailing sil token: the model emits no
    space after a clip's last word, which would then never complete; spaces between words are the decoder's sil."""
    lm_tokens(tokenizer)  # a character tokenizer, or the error that says why not
    words = sorted({w for line in lines for w in line.split()})
    return [f"{w}\t{' '.join(w)}" for w in words]


def lmplz_path(tool: str = "lmplz") -> str:
    """A KenLM program (lmplz, build_binary): $MLPL_LMPLZ's folder, else build/kenlm/bin in the checkout, else on
    PATH.

    Raises:
        FileNotFoundError: naming the fix when none is found.
    """
    env = os.environ.get("MLPL_LMPLZ")
    candidates = [env and str(Path(env).with_name(tool)), str(Path(__file__).resolve().parents[2] / "build/kenlm/bin"
                                                                / tool), shutil.which(tool)]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"KenLM's {tool} was not found: {LMPLZ_FIX}")


def estimate_arpa(lines: list[str], order: int, prune: list[int], out_path: str) -> str:
    """Modified Kneser-Ney n-gram LM of the lines by KenLM's lmplz, written as ARPA to out_path; lmplz's log.

    Raises:
        RuntimeError: lmplz failed (its last lines say why).
    """
    with tempfile.TemporaryDirectory(prefix="mlpl-lmplz-") as tmp:
        text = os.path.join(tmp, "text.txt")
        Path(text).write_text("\n".join(lines) + "\n", encoding="utf-8")
        # --discount_fallback: small per-language texts lack the count-of-counts modified KN needs at high orders.
        cmd = [lmplz_path(), "-o", str(order), "--discount_fallback", "-S", "20%", "-T", tmp, "--text", text,
               "--arpa", out_path]
        if prune:
            cmd += ["--prune", *map(str, prune)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"lmplz failed ({done.returncode}): {tail}")
    return done.stderr


def binarize(arpa_path: str, out_path: str) -> None:
    """KenLM's binary form of an ARPA file (loads in milliseconds, memory-mapped, and silently).

    Raises:
        RuntimeError: build_binary failed (its last lines say why).
    """
    done = subprocess.run([lmplz_path("build_binary"), "-S", "20%", arpa_path, out_path], capture_output=True,
                          text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"build_binary failed ({done.returncode}): {tail}")


def _ctc_decoder():
    """torchaudio's ctc_decoder, or a one-line error naming the fix when flashlight-text is missing."""
    try:
        import flashlight.lib.text.decoder  # noqa: F401  (torchaudio imports it lazily; fail here, clearly)
        from torchaudio.models.decoder import ctc_decoder
    except ImportError as err:
        raise ImportError(f"LM-fused decoding needs flashlight-text: {FLASHLIGHT_FIX} ({err})") from None
    return ctc_decoder


class BeamDecoder:
    """One language's LM-fused CTC beam search over a local LM folder (lm.arpa, tokens.txt, lm_dict.txt and,
    for the word unit, lexicon.txt)."""

    def __init__(self, cfg: BeamDecoderConfig, lm_dir: str, tokenizer: Tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.lm_dir = lm_dir
        tokens = lm_tokens(tokenizer)
        on_disk = Path(lm_dir, "tokens.txt").read_text(encoding="utf-8").splitlines()
        if on_disk != tokens:
            raise ValueError(f"the LM in {lm_dir} was built for another vocabulary than the teacher's; rebuild it "
                             "from the teacher's checkpoint")
        self.sil = sil_token(tokenizer)
        word = cfg.unit == "word"
        self._decoder = _ctc_decoder()(
            lexicon=str(Path(lm_dir, "lexicon.txt")) if word else None, tokens=tokens,
            lm=str(Path(lm_dir, "lm.bin")), lm_dict=None if word else str(Path(lm_dir, "lm_dict.txt")),
            nbest=1, beam_size=cfg.beam_size, beam_size_token=cfg.beam_size_token, beam_threshold=cfg.beam_threshold,
            lm_weight=cfg.lm_weight, word_score=cfg.word_score, sil_score=cfg.sil_score, log_add=cfg.log_add,
            unk_score=float("-inf") if word else 0.0, blank_token=BLANK, sil_token=self.sil, unk_word=UNK)

    def decode(self, log_probs: torch.Tensor) -> str:
        """The best hypothesis' text for one utterance's (T, V) log-probabilities."""
        emissions = log_probs.detach().to(torch.float32).cpu().contiguous().unsqueeze(0)
        hyp = self._decoder(emissions)[0]
        if not hyp:
            return ""
        if self.cfg.unit == "word":
            return " ".join(hyp[0].words)
        # Lexicon-free: the tokens are the characters (blank and repeats already merged by the decoder).
        return prepare_text(self.tokenizer.decode(t for t in hyp[0].tokens.tolist()))


_DECODERS: dict[tuple[str, str, tuple[str, ...]], BeamDecoder] = {}


def _decoder_key(cfg: BeamDecoderConfig, lm_dir: str, tokenizer: Tokenizer) -> tuple[str, str, tuple[str, ...]]:
    """What makes two beam searches the same: config, LM folder, vocabulary."""
    return cfg.model_dump_json(), lm_dir, tuple(lm_tokens(tokenizer))


def cached_decoder(cfg: BeamDecoderConfig, lm_dir: str, tokenizer: Tokenizer) -> BeamDecoder:
    """A BeamDecoder per (config, LM folder, vocabulary), built once per process (loading an LM costs seconds)."""
    key = _decoder_key(cfg, lm_dir, tokenizer)
    if key not in _DECODERS:
        if len(_DECODERS) >= 16:
            _DECODERS.pop(next(iter(_DECODERS)))
        _DECODERS[key] = BeamDecoder(cfg, lm_dir, tokenizer)
    return _DECODERS[key]


class BeamWorkers:
    """A language's LM-fused beam search in child processes, so decoding one batch overlaps the model's work on the
    next: flashlight-text's decoder holds the GIL, so threads of one process do not overlap it (measured slower,
    docs/benchmarks.md). Each child loads the LM once; `submit` returns a future of the texts."""

    def __init__(self, decoder: BeamDecoder, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.cfg = decoder.cfg
        # spawn, not fork: a forked child of a process whose OpenMP threads are running can hang.
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker,
                                         initargs=(decoder.cfg.model_dump(mode="json"), decoder.lm_dir,
                                                   decoder.tokenizer.to_dict()))
        self._pool.submit(int)  # start the children now: they load while the model runs its first batch

    def submit(self, log_probs: list[torch.Tensor]) -> Future:
        """A future of the best hypothesis' text for each utterance's (T, V) log-probabilities (it fails with
        BrokenProcessPool when a child died)."""
        arrays = [lp.detach().to(torch.float32).cpu().numpy() for lp in log_probs]
        try:
            return self._pool.submit(_decode_in_worker, arrays)
        except BrokenProcessPool as err:
            failed: Future = Future()
            failed.set_exception(err)
            return failed

    def close(self) -> None:
        """Stop the children."""
        self._pool.shutdown(wait=True, cancel_futures=True)


_WORKER: BeamDecoder | None = None


def _start_worker(cfg: dict, lm_dir: str, tokenizer: dict) -> None:
    from pipeline.data.tokenizer import tokenizer_from_dict

    global _WORKER
    torch.set_num_threads(1)
    _WORKER = BeamDecoder(BeamDecoderConfig(**cfg), lm_dir, tokenizer_from_dict(tokenizer))


def _decode_in_worker(arrays: list) -> list[str]:
    assert _WORKER is not None
    return [_WORKER.decode(torch.from_numpy(a)) for a in arrays]


_WORKER_POOLS: dict[tuple[str, str, tuple[str, ...], int], BeamWorkers] = {}


def cached_workers(decoder: BeamDecoder, workers: int) -> BeamWorkers | None:
    """`workers` decoding processes for a decoder, started once per process and kept for its next units (the two
    most recent decoders'); None when `workers` is 0 or this process may not start children (a daemonic one, e.g.
    a Dask worker): decode in-process then."""
    import multiprocessing

    if workers < 1 or multiprocessing.current_process().daemon:
        return None
    key = (*_decoder_key(decoder.cfg, decoder.lm_dir, decoder.tokenizer), workers)
    if key not in _WORKER_POOLS:
        while len(_WORKER_POOLS) >= 2:
            _WORKER_POOLS.pop(next(iter(_WORKER_POOLS))).close()
        _WORKER_POOLS[key] = BeamWorkers(decoder, workers)
    return _WORKER_POOLS[key]


def drop_workers(workers: BeamWorkers) -> None:
    """Stop one set of decoding processes and forget it (e.g. after one of them died)."""
    for key, pool in list(_WORKER_POOLS.items()):
        if pool is workers:
            del _WORKER_POOLS[key]
    workers.close()


def close_workers() -> None:
    """Stop every decoding process this process started."""
    while _WORKER_POOLS:
        _WORKER_POOLS.popitem()[1].close()


atexit.register(close_workers)
