"""espeak-ng speech, driven in-process through the library the `espeakng-loader` wheel ships.

The corpus needs real speech without internet (docs/architecture.md, "Environment facts"): espeak-ng covers ~114
languages with one engine, so a voice never gives a language away. We call its C API with ctypes in
synchronous mode and collect 16-bit PCM at the engine's rate (22 050 Hz).

espeak-ng keeps state between utterances (pitch flutter position, wave generator phase, libc rand), so
the same call twice in one process gives different samples. Every utterance is therefore synthesized in
a fork of a process whose engine is initialized but has never spoken: the child starts from the same
pristine state every time, which makes audio a pure function of (text, voice, parameters, seed) no
matter the order or the worker that runs it. That process is a small server (`serve`) started once per
calling process, so the fork is cheap even when the caller has torch loaded.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import espeakng_loader
import numpy as np

# espeak_AUDIO_OUTPUT: synchronous synthesis, samples delivered to our callback.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
# espeak_PARAMETER ids.
_RATE, _PITCH, _RANGE = 1, 3, 4

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# Voice variants (espeak-ng-data/voices/!v) that sound like plain human speech, shared by every language:
# the classic male/female formant variants and the Klatt-synthesizer ones. Novelty voices (whisper,
# croak, robots) are left out so the corpus stays intelligible.
VOICE_VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3",
)  # fmt: skip

_SERVER_LOCK = threading.Lock()

# espeak-ng voice for each corpus language code where the two differ.
_ESPEAK_VOICE = {"en": "en-us", "pt": "pt", "fr": "fr", "lv": "lv", "lt": "lt"}


@dataclass(frozen=True)
class VoiceSettings:
    """How one synthetic speaker talks: espeak variant, base pitch and range (0-100), rate (words/min)."""

    variant: str
    pitch: int
    pitch_range: int
    rate_wpm: int


@dataclass(frozen=True)
class _Engine:
    lib: ctypes.CDLL
    libc: ctypes.CDLL
    sample_rate: int
    version: str


def espeak_voice(language: str) -> str:
    """The espeak-ng voice name for a corpus language code."""
    return _ESPEAK_VOICE.get(language, language)


@functools.lru_cache(maxsize=1)
def _engine() -> _Engine:
    # Cached per process; the engine is initialized here but never speaks in this process (see module doc).
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    lib.espeak_Info.restype = ctypes.c_char_p
    data_path = espeakng_loader.get_data_path().encode()
    sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT)
    if sample_rate <= 0:
        raise RuntimeError(f"espeak-ng failed to initialize with data at {data_path.decode()}")
    version = (lib.espeak_Info(None) or b"").decode()
    libc = ctypes.CDLL(None)
    return _Engine(lib=lib, libc=libc, sample_rate=sample_rate, version=version)


def engine_sample_rate() -> int:
    """Sample rate of espeak-ng's output (22 050 Hz)."""
    return _engine().sample_rate


def engine_version() -> str:
    """espeak-ng library version string, for the corpus card."""
    return _engine().version


def synthesize(text: str, language: str, voice: VoiceSettings, seed: int) -> np.ndarray:
    """Speak text in a language with a voice; int16 mono samples at engine_sample_rate().

    Raises:
        ValueError: espeak-ng has no such voice.
        RuntimeError: synthesis failed or the synthesis server died.
    """
    request = json.dumps({"text": text, "language": language, "voice": asdict(voice), "seed": seed}).encode()
    with _SERVER_LOCK:
        server = _server()
        try:
            server.stdin.write(struct.pack("<I", len(request)) + request)
            server.stdin.flush()
            code, size = struct.unpack("<iI", _read_exact(server.stdout, 8))
            pcm = _read_exact(server.stdout, size)
        except (BrokenPipeError, EOFError) as err:
            _server.cache_clear()
            raise RuntimeError(f"espeak-ng synthesis server exited (code {server.poll()})") from err
    if code == 2:
        raise ValueError(f"espeak-ng has no voice {espeak_voice(language)}+{voice.variant}")
    if code != 0:
        raise RuntimeError(f"espeak-ng synthesis failed (exit {code}) for {language} text {text[:60]!r}")
    return np.frombuffer(pcm, dtype=np.int16)


@functools.lru_cache(maxsize=1)
def _server() -> subprocess.Popen:
    # A small helper process that only holds the engine: forking it per utterance costs ~1 ms, where
    # forking a worker that has torch loaded costs ~15 ms of page-table copying.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    return subprocess.Popen(
        [sys.executable, "-c", "from pipeline.corpus.speech import serve; serve()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip


def serve() -> None:
    """Synthesis server loop over stdin/stdout: length-prefixed JSON requests, PCM replies, until EOF."""
    engine = _engine()
    # Keep the protocol on a private copy of stdout; anything the library prints goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    while True:
        try:
            (size,) = struct.unpack("<I", _read_exact(inp, 4))
        except EOFError:
            return
        req = json.loads(_read_exact(inp, size))
        code, pcm = _fork_and_speak(engine, req["text"], req["language"], VoiceSettings(**req["voice"]), req["seed"])
        out.write(struct.pack("<iI", code, len(pcm)) + pcm)
        out.flush()


def _read_exact(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError(f"stream ended after {len(data)} of {size} bytes")
    return data


def _fork_and_speak(engine: _Engine, text: str, language: str, voice: VoiceSettings, seed: int) -> tuple[int, bytes]:
    """Speak once in a fork of this process (whose engine never spoke); return (exit code, PCM bytes)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: speak from the pristine engine state, stream PCM into the pipe, exit
        os.close(read_fd)
        code = 1
        try:
            code = _speak_into(engine, write_fd, text, language, voice, seed)
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(1 << 16):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def _speak_into(engine: _Engine, fd: int, text: str, language: str, voice: VoiceSettings, seed: int) -> int:
    lib = engine.lib

    def on_samples(wav, num_samples, _events):  # espeak calls this with each block of PCM
        if num_samples > 0:
            data = ctypes.string_at(wav, num_samples * 2)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        return 0

    callback = _SYNTH_CALLBACK(on_samples)
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(f"{espeak_voice(language)}+{voice.variant}".encode()) != 0:
        return 2
    lib.espeak_SetParameter(_RATE, int(voice.rate_wpm), 0)
    lib.espeak_SetParameter(_PITCH, int(voice.pitch), 0)
    lib.espeak_SetParameter(_RANGE, int(voice.pitch_range), 0)
    # Breath/aspiration noise draws from espeak's own generator and from libc rand(): seed both.
    lib.espeak_ng_SetRandSeed(seed)
    engine.libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
    encoded = text.encode("utf-8") + b"\0"
    if lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None) != 0:
        return 3
    lib.espeak_Synchronize()
    os.close(fd)
    return 0


def has_voice(language: str) -> bool:
    """Whether espeak-ng ships a voice for the language (checked without speaking)."""
    data = espeakng_loader.get_data_path()
    name = espeak_voice(language)
    if not os.path.exists(os.path.join(data, f"{name.split('-')[0]}_dict")):
        return False
    lang_dir = os.path.join(data, "lang")
    for _root, _dirs, files in os.walk(lang_dir):
        if name.lower() in {f.lower() for f in files}:
            return True
    return False
