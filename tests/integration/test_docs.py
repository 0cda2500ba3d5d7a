"""Every code block of README.md and docs/*.md runs as written; the docs point at files that exist.

The rules the pages follow (what this file checks):

* Every code block is fenced and names its language: ``python`` and ``bash`` blocks are
  run; ``yaml``, ``json`` and ``csv`` blocks are files and are parsed; ``text`` blocks are
  output or formats and are only shown. An indented (unfenced) block is an error.
* A block is run in a tmp folder of its page, after the page's earlier blocks, in page
  order (a later block may use what an earlier one wrote: a registered model, a report).
  ``.venv`` there links to the repository's, so ``.venv/bin/python`` and
  ``.venv/bin/model-audit`` work as written; ``PATH`` starts with it, so ``python`` and
  ``model-audit`` do too; ``MLFLOW_TRACKING_URI`` is ``sqlite:///<tmp>/mlflow.db``, and
  the configs' ``paths.root_dir`` (``.``) is the tmp folder, so nothing lands in the
  repository. ``Makefile`` and ``tests`` are linked and ``pyproject.toml`` copied (its
  mtime put before the install stamp, so ``make`` finds ``.venv`` installed and never
  runs pip) for the blocks that call ``make``.
* An HTML comment right before a block (invisible on GitHub) may say what the block
  needs, ``<!-- docs-test: key=value; key=value -->``:

  - ``slow=<reason>``: the block takes minutes; it runs under ``make test-slow`` only.
    A fast block never relies on a slow one: a fast block's earlier blocks are run
    first only when they are fast.
  - ``fixture=<name>``: :data:`FIXTURES` prepares the folder first (files, a registry)
    and, for a Python block, may define names the block uses (``model``, ``probes``).
  - ``exit=<codes>``: the exit codes besides 0 that a bash block's commands may end
    with, e.g. ``1`` for ``model-audit``, whose 1 is a verdict (FAIL or INCONCLUSIVE);
    any other code stops the block and fails the test. Without it bash runs with
    ``-eo pipefail``.
  - ``not-run=<reason>``: a command that needs what no test machine has (GitHub itself);
    reported as skipped with the reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
VENV = REPO / ".venv"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = ("python", "bash")
PARSE = ("yaml", "json", "csv")
SHOW = ("text",)
OPTIONS = ("slow", "fixture", "exit", "not-run")
FAST_TIMEOUT_S = 180
SLOW_TIMEOUT_S = 3600
_ANNOTATION = re.compile(r"^<!--\s*docs-test:(.*?)-->\s*$", re.S)


@dataclass
class Block:
    page: Path
    index: int  # position among the page's fenced blocks
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}:{self.lang or 'none'}"

    @property
    def runs(self) -> bool:
        return self.lang in RUN and "not-run" not in self.options


def parse_options(text: str) -> dict[str, str]:
    """``key=value; key=value``; a part that does not start with ``word=`` continues the value before it."""
    options: dict[str, str] = {}
    key = None
    for part in text.split(";"):
        m = re.match(r"\s*([a-z][a-z-]*)\s*=(.*)$", part, re.S)
        if m:
            key = m.group(1)
            options[key] = m.group(2).strip()
        elif key is not None:
            options[key] = f"{options[key]}; {part.strip()}"
        elif part.strip():
            options[part.strip()] = ""
    return options


def parse_page(page: Path) -> tuple[list[Block], list[int]]:
    """The page's fenced blocks, and the lines of its indented (unfenced) code blocks."""
    tokens = MarkdownIt("commonmark").parse(page.read_text(encoding="utf-8"))
    blocks, indented = [], []
    for i, tok in enumerate(tokens):
        if tok.type == "code_block":
            indented.append(tok.map[0] + 1)
        if tok.type != "fence":
            continue
        options: dict[str, str] = {}
        prev = tokens[i - 1] if i else None
        if prev is not None and prev.type == "html_block":
            m = _ANNOTATION.match(prev.content.strip())
            if m:
                options = parse_options(m.group(1))
        lang = tok.info.strip().split()[0] if tok.info.strip() else ""
        blocks.append(Block(page, len(blocks), tok.map[0] + 1, lang, tok.content, options))
    return blocks, indented


BLOCKS = {page: parse_page(page)[0] for page in PAGES}
ALL = [b for blocks in BLOCKS.values() for b in blocks]


# ------------------------------------------------------------------------------ fixtures
def _register_snow_wolf(workdir: Path) -> None:
    """``snow-wolf`` v1 and v2 (untrained SmallCNNs, allowed by the default allow-list), alias
    ``candidate`` on v2; ``last.ckpt`` (a Classifier checkpoint), ``w.pt`` (a SmallCNN
    state_dict) and ``my_probes`` (a snow-wolf probe folder) beside them."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
from mlflow.tracking import MlflowClient
from _checkpoints import save_checkpoint
from audit.datasets import snow_wolf
from audit.gate.loading import log_model_safely
from audit.models import SmallCNN
from audit.training import Classifier

uri = "sqlite:///{workdir / "mlflow.db"}"
client = MlflowClient(uri, registry_uri=uri)
exp = client.create_experiment("train", artifact_location={(workdir / "artifacts").as_uri()!r})
net = {{"_target_": "audit.models.SmallCNN", "num_classes": 2}}
for seed in (0, 1):
    torch.manual_seed(seed)
    run = client.create_run(exp)
    log_model_safely(SmallCNN(num_classes=2), net, registered_name="snow-wolf",
                     run_id=run.info.run_id, tracking_uri=uri)
    client.set_terminated(run.info.run_id)
client.set_registered_model_alias("snow-wolf", "candidate", "2")
save_checkpoint(Classifier(net), __import__("pathlib").Path("last.ckpt"))
torch.save(SmallCNN(num_classes=2).state_dict(), "w.pt")
snow_wolf.probe_set(n_per_group=16, size=64, seed=1).save("my_probes")
"""
    _python(script, workdir, timeout=FAST_TIMEOUT_S)


def _probe_folder(workdir: Path) -> str:
    """A snow-wolf probe folder at ``path/to/folder`` (the README's placeholder path)."""
    _python(
        "from audit.datasets import snow_wolf\n"
        "snow_wolf.probe_set(n_per_group=4, size=32, seed=0).save('path/to/folder')\n",
        workdir,
        timeout=FAST_TIMEOUT_S,
    )
    return ""


def _cnn_and_probes(_workdir: Path) -> str:
    """``model``: an untrained SmallCNN (64 channels in ``features``); ``probes``: 16 balanced
    snow-wolf probes of 32 px with masks, groups and pairs; ``x``: their images."""
    return textwrap.dedent(
        """\
        from audit.datasets import snow_wolf as _snow_wolf
        from audit.models import SmallCNN as _SmallCNN
        model = _SmallCNN(num_classes=2).eval()
        probes = _snow_wolf.probe_set(n_per_group=4, size=32, seed=0)
        x = probes.images
        """
    )


def _shortcut_and_probes(_workdir: Path) -> str:
    """``model``: tests/_toy_models.ContextReader, which reads the background (snow -> wolf),
    so a gate FAILs it; ``probes``: 16 balanced snow-wolf probes; ``x``: their images."""
    return textwrap.dedent(
        f"""\
        import sys as _sys
        _sys.path.insert(0, {str(TESTS)!r})
        from _toy_models import ContextReader as _ContextReader
        from audit.datasets import snow_wolf as _snow_wolf
        model = _ContextReader().eval()
        probes = _snow_wolf.probe_set(n_per_group=4, size=32, seed=0)
        x = probes.images
        """
    )


def _snow_wolf_registry(workdir: Path) -> str:
    _register_snow_wolf(workdir)
    return ""


#: name -> prepare(workdir) returning Python lines to run before a Python block ('' for none)
FIXTURES = {
    "probe_folder": _probe_folder,
    "cnn_and_probes": _cnn_and_probes,
    "shortcut_and_probes": _shortcut_and_probes,
    "snow_wolf_registry": _snow_wolf_registry,
}


# ------------------------------------------------------------------------------ running
def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "MLFLOW_REGISTRY_URI")}
    env.update(
        PATH=f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONUNBUFFERED="1",
        HOME=str(workdir / "home"),
    )
    return env


def _python(script: str, workdir: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", script],
        cwd=workdir,
        env=_env(workdir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode:
        raise AssertionError(f"fixture setup failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _workdir(root: Path) -> Path:
    """A folder laid out like a checkout for the blocks: the venv, the Makefile and the tests."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    for name in (".venv", "Makefile", "tests"):
        (root / name).symlink_to(REPO / name)
    shutil.copyfile(REPO / "pyproject.toml", root / "pyproject.toml")
    stamp = VENV / ".installed"
    if stamp.exists():  # installed: `make` must not reinstall into the shared venv
        t = stamp.stat().st_mtime - 60
        os.utime(root / "pyproject.toml", (t, t))
    return root


def _allowed_exits(block: Block) -> set[int]:
    return {int(c) for c in block.options.get("exit", "0").split(",")}


def run_block(block: Block, workdir: Path) -> None:
    """Run one block in ``workdir``; raise AssertionError with its output when it fails."""
    prelude = ""
    fixture = block.options.get("fixture")
    if fixture:
        prelude = FIXTURES[fixture](workdir)
    timeout = SLOW_TIMEOUT_S if "slow" in block.options else FAST_TIMEOUT_S
    allowed = _allowed_exits(block)
    if block.lang == "python":
        script = workdir / f"_block_{block.index}.py"
        script.write_text(prelude + block.code)
        cmd = [str(VENV / "bin" / "python"), script.name]
    else:
        script = workdir / f"_block_{block.index}.sh"
        if allowed == {0}:
            head = "set -eo pipefail\n"
        else:  # a listed code (a verdict) goes on; any other stops the block with its code
            codes = "|".join(str(c) for c in sorted(allowed))
            head = (
                f"set -o pipefail\ntrap 'rc=$?; case $rc in {codes}) ;; *) exit $rc ;; esac' ERR\n"
            )
        script.write_text(head + block.code)
        cmd = ["bash", "--noprofile", "--norc", script.name]
    done = subprocess.run(
        cmd, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode not in allowed | {0}:
        raise AssertionError(
            f"{block.id} exited {done.returncode} (allowed: {sorted(allowed | {0})})\n"
            f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )


class PageRun:
    """The blocks of one page run so far, in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = _workdir(folder)
        self.ran: set[int] = set()
        self.failed: dict[int, str] = {}

    def run(self, block: Block) -> None:
        for earlier in BLOCKS[block.page][: block.index]:
            if earlier.index in self.ran or not earlier.runs or "slow" in earlier.options:
                continue
            self._run(earlier)
        bad = {i: why for i, why in self.failed.items() if i < block.index}
        if bad:
            i = min(bad)
            pytest.fail(
                f"an earlier block of the page failed ({BLOCKS[block.page][i].id}): {bad[i][:2000]}"
            )
        self._run(block)
        if block.index in self.failed:
            pytest.fail(self.failed[block.index])

    def _run(self, block: Block) -> None:
        self.ran.add(block.index)
        try:
            run_block(block, self.folder)
        except (AssertionError, subprocess.TimeoutExpired) as err:
            self.failed[block.index] = str(err)


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory):
    runs: dict[Path, PageRun] = {}

    def get(page: Path) -> PageRun:
        if page not in runs:
            runs[page] = PageRun(tmp_path_factory.mktemp(page.stem.lower()) / "work")
        return runs[page]

    return get


def _param(block: Block):
    marks = [pytest.mark.slow] if "slow" in block.options else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in ALL if b.runs or "not-run" in b.options])
def test_block_runs(block: Block, page_runs):
    """The block runs as written and ends with an allowed exit code."""
    if "not-run" in block.options:
        pytest.skip(f"not run: {block.options['not-run']}")
    page_runs(block.page).run(block)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in ALL if b.lang in PARSE])
def test_file_block_parses(block: Block):
    """A block that shows a file (YAML, JSON, CSV) is that file: it parses."""
    if block.lang == "yaml":
        assert yaml.safe_load(block.code) is not None
    elif block.lang == "json":
        json.loads(block.code)
    else:
        rows = list(csv.reader(io.StringIO(block.code)))
        assert len(rows) >= 2 and all(len(r) == len(rows[0]) for r in rows), rows


# ------------------------------------------------------------------------------ page rules
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_block_is_fenced_with_a_language(page: Path):
    blocks, indented = parse_page(page)
    assert not indented, (
        f"{page.name}: indented code blocks at lines {indented}; fence them with a language"
    )
    bad = [(b.line, b.lang) for b in blocks if b.lang not in (*RUN, *PARSE, *SHOW)]
    assert not bad, f"{page.name}: blocks without a known language (line, language): {bad}"


def test_annotations_name_known_options():
    for b in ALL:
        unknown = set(b.options) - set(OPTIONS)
        assert not unknown, f"{b.id}: unknown docs-test options {sorted(unknown)}; known: {OPTIONS}"
        if "fixture" in b.options:
            assert b.options["fixture"] in FIXTURES, f"{b.id}: no fixture {b.options['fixture']!r}"
        if "slow" in b.options or "not-run" in b.options:
            key = "slow" if "slow" in b.options else "not-run"
            assert b.options[key], f"{b.id}: {key}= needs a reason"
        if b.options and b.lang not in RUN:
            pytest.fail(
                f"{b.id}: a {b.lang} block is never run; docs-test options belong to python/bash blocks"
            )


def test_the_parser_sees_indented_blocks_and_annotations(tmp_path):
    """The rules above can fail: an indented block and a block without a language are found."""
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n    make demo\n\n<!-- docs-test: slow=minutes; exit=0,1 -->\n```bash\nls\n```\n\n```\nx\n```\n"
    )
    blocks, indented = parse_page(page)
    assert indented == [3]
    assert [(b.lang, b.options) for b in blocks] == [
        ("bash", {"slow": "minutes", "exit": "0,1"}),
        ("", {}),
    ]
    assert parse_options(" not-run=needs GitHub; a token (and x=1 inside); fixture=f ") == {
        "not-run": "needs GitHub; a token (and x=1 inside)",
        "fixture": "f",
    }


def _project_files() -> list[Path]:
    """Every file of the checkout that git does not ignore (tracked or not): no .venv, build, reports."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = [REPO / line for line in out.splitlines() if line]
    return [
        f
        for f in files
        if f.is_file() and not f.is_relative_to(VENV) and not f.is_relative_to(REPO / "build")
    ]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def test_no_file_points_at_design_notes_outside_the_repository():
    """Two notes that never shipped with the repository are named nowhere; docs/ replaces them."""
    missing = re.compile(r"\b(?:DESIGN|FACTS)\.md\b")
    hits = [
        f"{f.relative_to(REPO)}:{n}"
        for f in _project_files()
        for n, line in enumerate(_text(f).splitlines(), 1)
        if missing.search(line)
    ]
    assert not hits, f"references to notes that are not in the repository: {hits}"


_DOC_PATH = re.compile(r"\bdocs/[A-Za-z0-9_./-]+?\.md\b")


def test_every_docs_page_named_in_code_configs_and_messages_exists():
    named: dict[str, list[str]] = {}
    for f in _project_files():
        if (
            f.suffix not in (".py", ".yaml", ".yml", ".md", ".toml", ".cfg", ".txt")
            and f.name != "Makefile"
        ):
            continue
        for n, line in enumerate(_text(f).splitlines(), 1):
            for m in _DOC_PATH.finditer(line):
                named.setdefault(m.group(0), []).append(f"{f.relative_to(REPO)}:{n}")
    assert "docs/probes.md" in named, "the probe folder messages point at docs/probes.md"
    absent = {p: where for p, where in named.items() if not (REPO / p).is_file()}
    assert not absent, f"docs pages named but missing: {absent}"


_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path):
    text = page.read_text(encoding="utf-8")
    broken = [
        t
        for t in _LINK.findall(text)
        if "://" not in t and not t.startswith("mailto:") and not (page.parent / t).exists()
    ]
    assert not broken, f"{page.name}: links to files that do not exist: {broken}"


def test_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"
