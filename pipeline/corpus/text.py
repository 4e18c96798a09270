"""Real sentences per language for the synthetic corpus, fetched from Debian at build time.

The paper trains on read speech of natural sentences (Common Voice) and on long parliament speeches
(VoxPopuli). We commit no third-party text: sentences come from Debian's LibreOffice help packages
(`libreoffice-help-<lang>`, MPL-2.0, thousands of translated help paragraphs) or, for languages without
help, the UI message catalogs of `libreoffice-l10n-<lang>`. Packages are fetched with `apt-get download`
(no install), unpacked with `dpkg-deb -x`, and the filtered sentences cached as
`<cache>/text/<lang>.txt`, so a rebuild is offline and instant.

The filter keeps what espeak-ng reads the way it is written: one sentence, 4-14 words, letters of the
language's own alphabet, plain punctuation, no digits, acronyms, markup, paths, quotes or brackets, and
nothing that is identical to the English help (untranslated strings).

The out-of-domain test set needs text from another domain: `load_ood_sentences` reads the gettext catalogs
of a fixed set of GNOME desktop applications (`OOD_PACKAGES`: mail, browser, file manager, image editor,
spreadsheet, settings: dialog messages, confirmations and setting descriptions), translated by the GNOME
language teams, and cached as `<cache>/text-ood/<lang>.txt`. Entries with format placeholders, markup or
mnemonics are dropped, and so is any msgstr identical to its msgid; the same filter then applies. English
uses the msgids themselves.
"""

from __future__ import annotations

import gettext
import json
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from pipeline.data.text import normalize_text
from storage.files import join, read_text

# Bump when the extraction or the filter changes, so cached sentence files are rebuilt.
FILTER_VERSION = 3
MIN_WORDS = 4
MAX_WORDS = 14
MAX_CHARS = 110

# Lower-case letters each language may use beyond a-z (Greek: its own alphabet only). A sentence with any
# other letter is dropped: that is both the script check and a guard against foreign product names.
_LATIN = "abcdefghijklmnopqrstuvwxyz"
_GREEK = "αβγδεζηθικλμνξοπρστυφχψωςάέήίόύώϊϋΐΰ"
LANGUAGE_LETTERS: dict[str, str] = {
    "cs": _LATIN + "áčďéěíňóřšťúůýž",
    "de": _LATIN + "äöüß",
    "el": _GREEK,
    "en": _LATIN,
    "es": _LATIN + "áéíóúüñ",
    "et": _LATIN + "äöõüšž",
    "fi": _LATIN + "äöå",
    "fr": _LATIN + "àâæçéèêëîïôœùûüÿ",
    "hu": _LATIN + "áéíóöőúüű",
    "it": _LATIN + "àèéìíîòóùú",
    "lt": _LATIN + "ąčęėįšųūž",
    "lv": _LATIN + "āčēģīķļņšūž",
    "nl": _LATIN + "éëïöü",
    "pl": _LATIN + "ąćęłńóśźż",
    "pt": _LATIN + "áâãàçéêíóôõú",
    "sl": _LATIN + "čšž",
    "sv": _LATIN + "åäöé",
}

# Languages whose LibreOffice help is not packaged get sentences from the UI catalogs instead.
_L10N_ONLY = {"lt", "lv"}
_HELP_PACKAGE_SUFFIX = {"en": "en-us"}

# Out-of-domain text: GNOME applications, all translated on l10n.gnome.org, whose teams are active for every
# language here (Slovenian and Greek included; the GNU tools' catalogs lack sl or el for many packages and hold
# few sentences). Chosen for the most sentences per MB; together ~44 MB of .deb, fetched once for all
# languages, >2,000 filtered sentences for each of es de el it fr sl (bookworm). Changing the list rebuilds
# the cache; so does a bump of OOD_VERSION (the extraction below) or FILTER_VERSION (the shared filter).
OOD_PACKAGES = (
    "brasero-common",
    "epiphany-browser-data",
    "evolution-common",
    "gedit-common",
    "gimp-data",
    "gnome-control-center-data",
    "gnome-settings-daemon-common",
    "gnome-software-common",
    "gnote",
    "gnumeric-common",
    "libgtk-3-common",
    "nautilus-data",
    "orca",
)
OOD_VERSION = 1
# English has no catalog of its own: its text is the msgids, read from the en_GB catalogs (kept complete).
_OOD_LOCALE = {"en": "en_GB"}
# An entry with a format placeholder, a variable, markup, an entity, a mnemonic (_Open, &Open) or a settings
# key (notify-sound-file) is UI plumbing, not running text: it is dropped whole, never stripped and spliced.
_UI_MARKUP = re.compile(r"%|\$|\{\w*\}|<[A-Za-z/!?][^>]*>|&#?\w+;|[_&](?=\w)|\b[a-z]+(?:-[a-z]+){2,}\b")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

# Paragraph kinds in the help html that hold running text (tables of options and lists included).
_TEXT_CLASSES = {"paragraph", "paragraphintable", "listitem"}
# Inline spans whose text is UI, code or keys: a sentence touching one is dropped, never spliced.
_TAINT_CLASSES = {"literal", "menuitem", "input", "keycode", "switchinline", "widget", "code", "acronym"}
_TAINT = "\x00"
_VOID_TAGS = {"br", "img", "input", "meta", "link", "hr", "col", "source", "wbr"}

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[¿¡]?[^\W\d_])")
_ABBREVIATION = re.compile(r"\b\w{1,3}\.\s?\w{1,3}\.")
_QUOTES = str.maketrans("", "", '«»“”„"‹›‚')
_SPACES = re.compile(r"\s+")
_ALLOWED_PUNCT = set(" ,.;:?!¿¡-'")
# Abbreviations that end a 'sentence' when the splitter cut inside "z. B." or "etc.".
_ABBREV_WORDS = {
    "usw",
    "bzw",
    "vgl",
    "ggf",
    "etc",
    "etw",
    "npr",
    "itd",
    "tj",
    "oz",
    "κλπ",
    "π",
    "χ",
    "ca",
    "sog",
}


def language_package(language: str) -> str:
    """Debian package whose text is used for a language."""
    if language in _L10N_ONLY:
        return f"libreoffice-l10n-{language}"
    return f"libreoffice-help-{_HELP_PACKAGE_SUFFIX.get(language, language)}"


def default_cache_dir() -> str:
    """The build cache: env MLPL_CACHE_DIR, else ~/.cache/mlpl."""
    return os.environ.get("MLPL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlpl")


def load_sentences(
    language: str, *, cache_dir: str | None = None, text_dir: str | None = None
) -> tuple[list[str], dict]:
    """Sorted, filtered sentences for a language and a record of where they came from.

    Raises:
        FileNotFoundError: text_dir is given but holds no `<language>.txt`.
        RuntimeError: the Debian package cannot be fetched (no apt-get, no network, unknown package).
        ValueError: the language has no letter table here.
    """
    _check_language(language)
    if text_dir is not None:
        return _load_text_dir(language, text_dir)
    cache = Path(cache_dir or default_cache_dir())
    stamp = {"filter_version": FILTER_VERSION}
    return _cached(cache / "text", language, stamp, lambda: _extract_from_debian(language, cache))


def load_ood_sentences(
    language: str, *, cache_dir: str | None = None, text_dir: str | None = None
) -> tuple[list[str], dict]:
    """Sorted, filtered out-of-domain sentences (GNOME catalogs, not LibreOffice) and where they came from.

    Raises:
        FileNotFoundError: text_dir is given but holds no `ood/<language>.txt`.
        RuntimeError: a Debian package cannot be fetched (no apt-get, no network, unknown package).
        ValueError: the language has no letter table here.
    """
    _check_language(language)
    if text_dir is not None:
        return _load_text_dir(language, text_dir, name=f"ood/{language}.txt")
    cache = Path(cache_dir or default_cache_dir())
    stamp = {"filter_version": FILTER_VERSION, "ood_version": OOD_VERSION, "packages": list(OOD_PACKAGES)}
    return _cached(cache / "text-ood", language, stamp, lambda: _extract_ood(language, cache))


def _check_language(language: str) -> None:
    if language not in LANGUAGE_LETTERS:
        raise ValueError(
            f"language {language!r} has no alphabet table in pipeline/corpus/text.py; "
            f"supported: {', '.join(sorted(LANGUAGE_LETTERS))}"
        )


def _cached(
    folder: Path, language: str, stamp: dict, extract: Callable[[], tuple[list[str], dict]]
) -> tuple[list[str], dict]:
    """`<folder>/<language>.txt` and its record, extracted anew when the record does not carry `stamp`."""
    text_file = folder / f"{language}.txt"
    meta_file = folder / f"{language}.json"
    if text_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if all(meta.get(key) == value for key, value in stamp.items()):
            return text_file.read_text(encoding="utf-8").splitlines(), meta
    sentences, meta = extract()
    _write_cache(text_file, "".join(s + "\n" for s in sentences))
    _write_cache(meta_file, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return sentences, meta


def _load_text_dir(language: str, text_dir: str, name: str | None = None) -> tuple[list[str], dict]:
    # Any fsspec URL; a local path keeps the form it always had, since it is part of the corpus identity.
    name = name or f"{language}.txt"
    path = join(text_dir, name) if "://" in text_dir else str(Path(text_dir) / name)
    try:
        lines = read_text(path).splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no sentence file for language {language!r}: expected {path} (one sentence a line, UTF-8)"
        ) from None
    kept = filter_sentences(language, lines)
    meta = {
        "source": "text_dir",
        "path": str(path),
        "lines": len(lines),
        "sentences": len(kept),
        "filter_version": FILTER_VERSION,
    }
    return kept, meta


def _write_cache(path: Path, text: str) -> None:
    # A local build cache, not a pipeline artifact: write-then-rename so a killed build leaves no stub.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _extract_from_debian(language: str, cache: Path) -> tuple[list[str], dict]:
    package = language_package(language)
    deb = fetch_deb(package, cache / "debian")
    version = _deb_field(deb, "Version")
    with tempfile.TemporaryDirectory(prefix="mlpl-deb-") as tmp:
        _unpack_deb(deb, tmp)
        if language in _L10N_ONLY:
            raw, english = _catalog_texts(Path(tmp))
        else:
            raw = list(_help_paragraphs(Path(tmp), package))
            english = set() if language == "en" else _english_help_sentences(cache)
    candidates = [s for p in raw for s in split_sentences(p)]
    kept = filter_sentences(language, candidates, english=english)
    meta = {
        "source": "debian",
        "package": package,
        "version": version,
        "license": "MPL-2.0",
        "paragraphs": len(raw),
        "sentences": len(kept),
        "filter_version": FILTER_VERSION,
    }
    return kept, meta


def _extract_ood(language: str, cache: Path) -> tuple[list[str], dict]:
    paragraphs: list[str] = []
    english: set[str] = set()
    versions: dict[str, str] = {}
    for package in OOD_PACKAGES:
        deb = fetch_deb(package, cache / "debian")
        versions[package] = _deb_field(deb, "Version")
        # One package at a time: gimp-data and evolution-common unpack to ~150 MB, of which we read ~3 MB.
        with tempfile.TemporaryDirectory(prefix="mlpl-deb-") as tmp:
            _unpack_deb(deb, tmp)
            texts, originals = ood_catalog_texts(Path(tmp), language)
        paragraphs += texts
        english |= originals
    kept = filter_sentences(language, [s for p in paragraphs for s in split_sentences(p)], english=english)
    meta = {
        "source": "debian-gettext",
        "packages": list(OOD_PACKAGES),
        "versions": versions,
        "license": "GPL/LGPL, each package's own (see its copyright file)",
        "paragraphs": len(paragraphs),
        "sentences": len(kept),
        "filter_version": FILTER_VERSION,
        "ood_version": OOD_VERSION,
    }
    return kept, meta


def _english_help_sentences(cache: Path) -> set[str]:
    """Normalized sentences of the English help, to drop strings a translation left in English."""
    english_file = cache / "text" / f"_english_help.v{FILTER_VERSION}.txt"
    if english_file.exists():
        return set(english_file.read_text(encoding="utf-8").splitlines())
    package = language_package("en")
    deb = fetch_deb(package, cache / "debian")
    with tempfile.TemporaryDirectory(prefix="mlpl-deb-") as tmp:
        _unpack_deb(deb, tmp)
        found = {normalize_text(s) for p in _help_paragraphs(Path(tmp), package) for s in split_sentences(p)}
    found.discard("")
    _write_cache(english_file, "".join(s + "\n" for s in sorted(found)))
    return found


def fetch_deb(package: str, deb_dir: Path) -> Path:
    """Download a Debian package into the cache (once) and return its path.

    Raises:
        RuntimeError: apt-get is missing or the download fails even after `apt-get update`.
    """
    target = deb_dir / f"{package}.deb"
    if target.exists():
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"apt-get/dpkg-deb not found, so {package} cannot be fetched for the corpus text. "
            "Pass --text-dir (build_corpus(text_dir=...)) with one sentence file per language, <lang>.txt."
        )
    deb_dir.mkdir(parents=True, exist_ok=True)
    # apt-get download writes into the working directory: use a temp dir, then move the file into place.
    with tempfile.TemporaryDirectory(prefix="mlpl-apt-") as tmp:
        result = _apt_download(package, tmp)
        if result.returncode != 0:
            # The package lists may be missing or stale (fresh container): refresh once and retry.
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            result = _apt_download(package, tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            raise RuntimeError(
                f"apt-get download {package} failed ({result.stderr.strip()[-400:]}). Check network access "
                "to the Debian mirror, or pass --text-dir with one sentence file per language, <lang>.txt."
            )
        tmp_target = deb_dir / f".{package}.deb.tmp-{os.getpid()}"
        shutil.move(str(debs[0]), tmp_target)
        tmp_target.replace(target)
    return target


def _unpack_deb(deb: Path, dest: str) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), dest], check=True, capture_output=True)


def _apt_download(package: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", "download", package], cwd=cwd, capture_output=True, text=True)


def _deb_field(deb: Path, field: str) -> str:
    out = subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _help_paragraphs(root: Path, package: str) -> Iterator[str]:
    """Running-text paragraphs of every help page, in sorted file order."""
    for path in sorted((root / "usr/share/libreoffice/help").rglob("*.html")):
        parser = _ParagraphParser()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        yield from parser.paragraphs


class _ParagraphParser(HTMLParser):
    """Collects the text of help paragraphs; UI/code spans inside become a taint mark."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, opens a tainted region)
        self._depth_in_p = 0
        self._taint_depth = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            return
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if tag == "p" and self._depth_in_p == 0:
            if classes & _TEXT_CLASSES:
                self._depth_in_p = 1
                self._parts = []
                self._stack = [("p", False)]
            return
        if self._depth_in_p:
            tainted = bool(classes & _TAINT_CLASSES) or "hidden" in attr or tag in {"code", "kbd", "pre"}
            if tainted:
                if self._taint_depth == 0:
                    self._parts.append(_TAINT)
                self._taint_depth += 1
            self._stack.append((tag, tainted))

    def handle_endtag(self, tag: str) -> None:
        if not self._depth_in_p or tag in _VOID_TAGS:
            return
        # Pop to the matching open tag; the help html is well formed but be lenient.
        while self._stack:
            open_tag, tainted = self._stack.pop()
            if tainted:
                self._taint_depth -= 1
            if open_tag == tag:
                break
        if not self._stack:
            self._depth_in_p = 0
            self._taint_depth = 0
            self.paragraphs.append(_SPACES.sub(" ", "".join(self._parts)).strip())

    def handle_data(self, data: str) -> None:
        if self._depth_in_p and self._taint_depth == 0:
            self._parts.append(data)


def _catalog_texts(root: Path) -> tuple[list[str], set[str]]:
    """Translated UI strings (msgstr) of the gettext catalogs and the English originals (msgid)."""
    texts: list[str] = []
    english: set[str] = set()
    for path in sorted(root.rglob("*.mo")):
        for msgid, msgstr in catalog_entries(path):
            english.add(normalize_text(msgid))
            texts.append(_SPACES.sub(" ", msgstr.replace("~", "")).strip())
    return texts, english


def catalog_entries(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .mo catalog, sorted; the header and plural forms are left out."""
    with path.open("rb") as fh:
        catalog = gettext.GNUTranslations(fh)._catalog  # the parsed msgid -> msgstr table
    # Plural entries are keyed (msgid, n) and nearly always hold a number placeholder: skipped.
    return [
        (msgid, msgstr)
        for msgid, msgstr in sorted(catalog.items(), key=lambda kv: str(kv[0]))
        if isinstance(msgid, str) and msgid and isinstance(msgstr, str)
    ]


def ood_catalog_texts(root: Path, language: str) -> tuple[list[str], set[str]]:
    """Usable paragraphs of an unpacked tree's catalogs for a language, and its English sentences (normalized).

    A msgstr is dropped when it equals its msgid (untranslated) or holds a placeholder, markup or mnemonic.
    For English the msgids are the text and the English set is empty.
    """
    locale = _OOD_LOCALE.get(language, language)
    texts: list[str] = []
    english: set[str] = set()
    for path in sorted((root / "usr/share/locale" / locale / "LC_MESSAGES").glob("*.mo")):
        for key, msgstr in catalog_entries(path):
            msgid = key.rpartition("\x04")[2]  # "context\x04msgid" when the entry has a msgctxt
            if language == "en":
                text = msgid
            else:
                english.update(normalize_text(s) for p in _paragraphs(msgid) for s in split_sentences(p))
                if msgstr == msgid:
                    continue
                text = msgstr
            if not _UI_MARKUP.search(text):
                texts += _paragraphs(text)
    english.discard("")
    return texts, english


def _paragraphs(text: str) -> list[str]:
    # A blank line parts paragraphs; a single newline inside one is only wrapping.
    return [p for p in (_SPACES.sub(" ", part).strip() for part in _PARAGRAPH_BREAK.split(text)) if p]


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph at sentence ends; paragraphs with dotted abbreviations are dropped whole."""
    if _ABBREVIATION.search(paragraph):
        return []
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


def clean_sentence(language: str, sentence: str) -> str | None:
    """The sentence as espeak should read it and the label should say it, or None when unusable."""
    s = unicodedata.normalize("NFC", sentence)
    if _TAINT in s:
        return None
    # Typographic apostrophes between letters are apostrophes (l'utente); other quote marks are dropped
    # here, before the text becomes both the label and what espeak reads.
    s = re.sub(r"(?<=\w)[’‘](?=\w)", "'", s).translate(_QUOTES).replace("’", "").replace("‘", "")
    s = _SPACES.sub(" ", s).strip()
    s = re.sub(r" (?=[?!:;])", "", s)  # French spaces before ? ! : ; are typography, not speech
    if not s or len(s) > MAX_CHARS:
        return None
    letters = LANGUAGE_LETTERS[language]
    for ch in s:
        if not (ch.lower() in letters or ch in _ALLOWED_PUNCT):
            return None  # digits, other scripts, symbols, brackets, ellipsis, slashes, markup remnants
    if s[-1] not in ".!?" and not (language == "el" and s[-1] == ";"):
        return None
    head = s.lstrip("¿¡")
    if not head or not head[0].isupper():
        return None
    words = s.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    for word in words:
        core = word.strip(",.;:?!¿¡")
        if not core or not any(c.isalpha() for c in core):
            return None  # stray punctuation, e.g. a dash standing alone
        if sum(c.isupper() for c in core) >= 2:
            return None  # acronyms and CamelCase names are spelled out or read oddly
        if core.startswith(("-", "'")) or core.endswith(("-", "'")):
            return None
    if words[-1].rstrip(".!?;").lower() in _ABBREV_WORDS or re.search(r"[.!?;:,]\S", s[:-1]):
        return None
    if re.search(r"[,;:]{2,}|[.!?]\s*[,;:]|\s[,;:.!?]", s) or s.count(".") + s.count("?") + s.count("!") > 1:
        return None
    return s


def filter_sentences(language: str, lines: Iterable[str], *, english: set[str] | None = None) -> list[str]:
    """Clean, deduplicate (by normalized form) and sort sentences; drop those found in English."""
    seen: dict[str, str] = {}
    for line in lines:
        s = clean_sentence(language, line)
        if s is None:
            continue
        key = normalize_text(s)
        if not key or (english and key in english) or key in seen:
            continue
        seen[key] = s
    return sorted(seen.values())
