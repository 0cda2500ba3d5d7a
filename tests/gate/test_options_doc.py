"""docs/options.md is the page audit.gate.options generates, and every key of the audit's config has a meaning there."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from audit.gate import options

ROOT = Path(__file__).resolve().parents[2]


def _paths(node, prefix: str = "") -> list[str]:
    """Every key path of a plain config: mappings and their keys (an empty mapping is a key itself)."""
    out = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, dict) and v:
            out += _paths(v, path + ".")
    return out


def test_committed_page_is_the_generated_one():
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert page == options.markdown(), (
        "docs/options.md is stale: run `python -m audit.gate.options > docs/options.md`"
    )


def _choices() -> list[tuple[str, str]]:
    return [(g.name, o.name) for g in options.groups() for o in g.options]


@pytest.mark.parametrize(("group", "option"), _choices())
def test_every_key_of_every_option_has_a_meaning(group, option):
    """Hydra composes audit.yaml with <group>=<option>; each key it yields is documented with a
    meaning, and each documented key exists (no stale entries)."""
    with initialize_config_module(config_module=options.CONF_PACKAGE, version_base="1.3"):
        cfg = compose(options.CONFIG_NAME, overrides=[f"{group}={option}"])
    composed = _paths(OmegaConf.to_container(cfg, resolve=False))
    documented = options.documented({group: option})
    missing = [p for p in composed if p not in documented or not documented[p].meaning.strip()]
    assert not missing, f"keys without a meaning in conf/ (add a YAML comment): {missing}"
    assert sorted(documented) == sorted(composed)
    page = options.markdown()
    for path in composed:
        assert f"- `{path}` = " in page or f"\n## {path}\n" in page, (
            path
        )  # a key, or a group's section


def test_a_comment_gives_a_key_its_meaning():
    """The parser on a file of its own: inline, continued, leading and trailing comments."""
    text = (
        "# What the file is.\n"
        "a: 1          # one\n"
        "              # more of one\n"
        "b:            # a mapping\n"
        "  c: [x, y]   # the list\n"
        "# above d\n"
        "d: ???\n"
        "e: 2\n"
        "# a note\n"
    )
    parsed = options.parse(text, "g", "o", "conf/g/o.yaml")
    assert parsed.description == "What the file is." and parsed.notes == "a note"
    assert [(k.path, k.default, k.meaning) for k in parsed.keys] == [
        ("a", "1", "one more of one"),
        ("b", "", "a mapping"),
        ("b.c", "[x, y]", "the list"),
        ("d", "???", "above d"),
        ("e", "2", ""),
    ]
