"""Out-of-domain text from gettext catalogs: what survives of a catalog, English, text_dir and the cache."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipeline.corpus import text
from pipeline.corpus.text import (
    FILTER_VERSION,
    OOD_PACKAGES,
    OOD_VERSION,
    filter_sentences,
    load_ood_sentences,
    ood_catalog_texts,
    split_sentences,
)

HEADER = "Content-Type: text/plain; charset=UTF-8\n"


def mo_bytes(entries: dict[str, str]) -> bytes:
    """A GNU .mo catalog (little endian, no hash table) holding `entries` plus the UTF-8 header."""
    items = sorted({"": HEADER, **entries}.items())
    ids = [k.encode() for k, _ in items]
    strs = [v.encode() for _, v in items]
    n = len(items)
    table_start = 7 * 4
    data_start = table_start + 2 * n * 8
    blob, id_table, str_table = b"", [], []
    for table, values in ((id_table, ids), (str_table, strs)):
        for value in values:
            table.append((len(value), data_start + len(blob)))
            blob += value + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, table_start, table_start + n * 8, 0, 0)
    tables = b"".join(struct.pack("<2I", *pair) for pair in id_table + str_table)
    return header + tables + blob


def write_catalog(root: Path, locale: str, entries: dict[str, str]) -> None:
    folder = root / "usr/share/locale" / locale / "LC_MESSAGES"
    folder.mkdir(parents=True)
    (folder / "app.mo").write_bytes(mo_bytes(entries))


GERMAN = {
    "The file could not be saved.": "Die Datei konnte nicht gespeichert werden.",
    "Do you really want to quit? All changes will then be lost.": (
        "Wollen Sie das Programm wirklich beenden? Alle Änderungen gehen dann verloren."
    ),
    "menu\x04Print the whole page right now.": "Die ganze Seite jetzt sofort drucken.",
    "The first line\nis wrapped here.\n\nAnd this is a second paragraph.": (
        "Die erste Zeile wird\nhier umbrochen.\n\nUnd das ist ein zweiter Absatz."
    ),
    # A placeholder, markup or mnemonic drops the whole entry, its clean sentences too.
    "%s is missing. Please choose another file.": "%s fehlt. Bitte wählen Sie eine andere Datei.",
    "{name} is missing. Please choose another file.": "{name} fehlt. Bitte wählen Sie eine andere Datei aus.",
    "<b>Caution</b> is no sentence. The disk is full.": "<b>Achtung</b> ist kein Satz. Die Platte ist leider voll.",
    "_Save the document. Otherwise it is lost.": "Dokument _speichern. Sonst geht es leider verloren.",
    "Used if notify-sound-file is set. It plays then.": "Siehe notify-sound-file. Dann wird sie gleich gespielt.",
    "Settings are saved automatically here.": "Settings are saved automatically here.",
    "Choose a color for the text here.": "The theme is used by all windows.",
    "The theme is used by all windows.": "Das Thema wird von allen Fenstern verwendet.",
    "One file was deleted.\0%d files were deleted.": "Eine Datei wurde gelöscht.\0%d Dateien wurden gelöscht.",
}


def sentences_of(root: Path, language: str) -> list[str]:
    paragraphs, english = ood_catalog_texts(root, language)
    return filter_sentences(language, [s for p in paragraphs for s in split_sentences(p)], english=english)


def test_catalog_keeps_translated_running_text_only(tmp_path):
    write_catalog(tmp_path, "de", GERMAN)
    write_catalog(tmp_path, "fr", {"The file could not be saved.": "Le fichier n'a pas pu être enregistré."})
    assert sentences_of(tmp_path, "de") == [
        "Alle Änderungen gehen dann verloren.",
        "Das Thema wird von allen Fenstern verwendet.",
        "Die Datei konnte nicht gespeichert werden.",
        "Die erste Zeile wird hier umbrochen.",
        "Die ganze Seite jetzt sofort drucken.",
        "Und das ist ein zweiter Absatz.",
        "Wollen Sie das Programm wirklich beenden?",
    ]


def test_english_reads_the_msgids_of_en_gb(tmp_path):
    write_catalog(tmp_path, "en_GB", {"Choose the color of the text.": "Choose the colour of the text."})
    assert sentences_of(tmp_path, "en") == ["Choose the color of the text."]
    assert sentences_of(tmp_path, "de") == []  # no catalog for the language: nothing, not another language


def test_text_dir_reads_the_ood_subfolder(tmp_path):
    (tmp_path / "ood").mkdir()
    (tmp_path / "ood" / "es.txt").write_text("El archivo no se pudo guardar.\nNo.\n", encoding="utf-8")
    sentences, meta = load_ood_sentences("es", text_dir=str(tmp_path))
    assert sentences == ["El archivo no se pudo guardar."]
    assert meta["source"] == "text_dir" and meta["path"].endswith("ood/es.txt")
    with pytest.raises(FileNotFoundError, match="ood/sl.txt"):
        load_ood_sentences("sl", text_dir=str(tmp_path))
    with pytest.raises(ValueError, match="alphabet table"):
        load_ood_sentences("xx", text_dir=str(tmp_path))


def test_cache_is_reused_until_the_package_list_changes(tmp_path, monkeypatch):
    calls = []

    def extract(language, cache):
        calls.append(language)
        meta = {"packages": list(OOD_PACKAGES), "filter_version": FILTER_VERSION, "ood_version": OOD_VERSION}
        return ["Die Datei konnte nicht gespeichert werden."], meta

    monkeypatch.setattr(text, "_extract_ood", extract)
    folder = tmp_path / "text-ood"
    folder.mkdir()
    (folder / "de.txt").write_text("Ein alter Satz aus dem Zwischenspeicher.\n", encoding="utf-8")
    stale = {"packages": ["gedit-common"], "filter_version": FILTER_VERSION, "ood_version": OOD_VERSION}
    (folder / "de.json").write_text(json.dumps(stale), encoding="utf-8")
    first, _ = load_ood_sentences("de", cache_dir=str(tmp_path))
    second, _ = load_ood_sentences("de", cache_dir=str(tmp_path))
    assert first == second == ["Die Datei konnte nicht gespeichert werden."]
    assert calls == ["de"]
