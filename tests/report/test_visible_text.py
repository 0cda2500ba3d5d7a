"""Invisible characters in hostile names are shown as escapes (``\\u202e``) in report.html, report.md
and on the console: one function, :func:`audit.report.text.visible`, used by the report and the job."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
from _jobkit import cli, probes_args, registry
from mlflow.tracking import MlflowClient

from audit.report.text import visible

#: A registered model name that MLflow accepts: shown raw, it reads "toyexe.jpg".
BIDI_NAME = "toy\u202egpj.exe"
BIDI = [
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u200e",
    "\u200f",
    "\u061c",
]
C0_C1 = [chr(c) for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]]


@pytest.mark.parametrize(
    "ch", BIDI + C0_C1 + ["\u200b", "\u200d", "\u2060", "\ufeff", "\u2028", "\u2029", "\ue000"]
)
def test_every_control_bidi_and_invisible_character_is_escaped(ch):
    shown = visible(f"a{ch}b")
    assert ch not in shown and shown.isprintable() and shown.isascii()
    assert (
        shown
        == "a"
        + ch.encode("unicode_escape")
        .decode("ascii")
        .replace("\\t", "\\x09")
        .replace("\\n", "\\x0a")
        .replace("\\r", "\\x0d")
        + "b"
    )


def test_printable_text_is_unchanged_and_kept_characters_stay():
    text = "wolf|snow ünïcödé 狼 ☃ \\u202e (a literal backslash-u)"
    assert visible(text) == text
    assert visible("line 1\n\tline 2\r") == "line 1\\x0a\\x09line 2\\x0d"
    assert visible("line 1\n\tline 2\r", keep="\n\t") == "line 1\n\tline 2\\x0d"
    assert visible(12.5) == "12.5"


def test_the_escape_names_the_character():
    assert visible("\u202e") == "\\u202e" and unicodedata.name("\u202e") == "RIGHT-TO-LEFT OVERRIDE"
    assert visible("\U000e0001") == "\\U000e0001"  # a tag character (format, outside the BMP)


@pytest.fixture(scope="module")
def bidi_audit(tmp_path_factory):
    """A real audit of a registry version whose name holds U+202E (MLflow 3.17 accepts it)."""
    root = tmp_path_factory.mktemp("bidi")
    uri = registry(root / "store", name=BIDI_NAME)
    return {"root": root, "uri": uri}


def test_a_bidi_model_name_is_escaped_on_the_console_and_in_every_report(bidi_audit, monkeypatch):
    root, uri = bidi_audit["root"], bidi_audit["uri"]
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_registered_model(BIDI_NAME).name == BIDI_NAME  # MLflow kept the name as given
    # Hydra's override grammar takes the character only inside quotes
    res = cli([f"model.uri='models:/{BIDI_NAME}/1'", *probes_args(root)], root)
    assert res.code == 0, res.out + res.err
    assert "\u202e" not in res.out + res.err
    assert "toy\\u202egpj.exe v1: PASS" in res.out
    assert "[model-audit] auditing toy\\u202egpj.exe on" in res.out
    folder = Path(re.search(r"report:\s+(\S+)/report\.html", res.out).group(1))
    html = (folder / "report.html").read_text(encoding="utf-8")
    md = (folder / "report.md").read_text(encoding="utf-8")
    for text in (html, md):
        assert "\u202e" not in text
        assert "toy\\u202egpj.exe" in text
    run = client.get_run(re.search(r"run:\s+(\w+)", res.out).group(1))
    assert (
        "toy\\u202egpj.exe" in run.data.tags["mlflow.note.content"]
    )  # the run's description (Markdown)
    assert "\u202e" not in run.data.tags["mlflow.note.content"]


def test_an_error_line_shows_the_escape_not_the_character(tmp_path, tracking_uri):
    res = cli([f"model.uri=models:/{BIDI_NAME}/1"], tmp_path)  # unquoted: Hydra cannot parse it
    assert res.code == 2 and len(res.errors) == 1, res.err
    assert "toy\\u202egpj.exe" in res.errors[0] and "\u202e" not in res.err, res.err
