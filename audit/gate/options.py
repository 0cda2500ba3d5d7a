"""Every option of the audit's config with its default and meaning, read from ``conf/`` (``audit.conf``).

The audit composes ``conf/audit.yaml``: its defaults list names the config groups the
audit uses (``paths``, ``model``, ``probes``, ...), each group is a folder of option
files, and every key's meaning is the YAML comment beside it (or the comment lines
just above it, or the indented comment lines below it). Hydra's ``--cfg job`` prints
the composed values but drops those comments, so this module keeps them:

* :func:`groups` and :func:`top_level` read the files (nothing is hard-coded: a new
  option file or key shows up by itself);
* :func:`help_groups` is the group list of ``model-audit --help`` (the resolver
  ``model_audit_groups`` used by ``hydra.help.template`` in ``conf/audit.yaml``);
* :func:`markdown` is ``docs/options.md``: ``python -m audit.gate.options > docs/options.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

__all__ = [
    "Key",
    "Option",
    "Group",
    "groups",
    "top_level",
    "documented",
    "help_groups",
    "markdown",
    "main",
]

CONF_PACKAGE = "audit.conf"
CONFIG_NAME = "audit"
#: audit.yaml's own keys that are not options of the audit (the defaults list; Hydra's settings)
_NOT_OPTIONS = ("defaults", "hydra")
_DEFAULTS_ITEM = re.compile(r"^\s*-\s*([A-Za-z_][\w-]*)\s*:\s*([\w.-]+)\s*(?:#\s?(.*))?$")
_COMMENT_LINE = re.compile(r"^(\s*)#\s?(.*)$")


@dataclass
class Key:
    """One key of an option file: dotted ``path`` below the group, the YAML ``default`` text, its ``meaning``."""

    path: str
    default: str
    meaning: str


@dataclass
class Option:
    """One option file (``conf/<group>/<name>.yaml``), or ``audit.yaml`` itself (``group`` empty)."""

    group: str
    name: str
    file: str
    description: str
    keys: list[Key] = field(default_factory=list)
    notes: str = ""


@dataclass
class Group:
    """A config group of the audit: its ``default`` option and the meaning given in audit.yaml's defaults."""

    name: str
    default: str
    meaning: str
    options: list[Option] = field(default_factory=list)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(
            f"{self.name}={name}: no such option (options: {[o.name for o in self.options]})"
        )


# --------------------------------------------------------------------------- reading the YAML
def _text(*parts: str) -> str:
    return resources.files(CONF_PACKAGE).joinpath(*parts).read_text(encoding="utf-8")


def _entries(node: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, key node, value node)`` of every mapping entry, depth first, in file order."""
    out: list[tuple[str, Any, Any]] = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}{k.value}"
            out.append((path, k, v))
            if isinstance(v, yaml.MappingNode) and not v.flow_style:
                out += _entries(v, path + ".")
    return out


def _inline_comment(line: str, start: int) -> str:
    """The comment that ends ``line`` after column ``start`` (where the value ends), if any."""
    rest = line[start:]
    at = rest.find("#")
    return rest[at + 1 :].strip() if at >= 0 and rest[:at].strip() in ("", ":") else ""


def parse(text: str, group: str = "", name: str = "", file: str = "") -> Option:
    """The keys of one YAML file with their defaults and meanings (see the module docstring).

    A comment at the top, before the first key, describes the file; comment lines just
    above a key (not indented deeper than it) belong to that key; comment lines indented
    deeper than the key just above them continue its meaning; comment lines after the
    last key are notes on the whole file.
    """
    lines = text.splitlines()
    found = _entries(yaml.compose(text))
    # audit.yaml's defaults list and Hydra's settings; a group file's own defaults list (/open/mapping@key)
    hidden = {
        k.start_mark.line
        for p, k, _ in found
        if p.split(".")[0] == "defaults" or not group and p.split(".")[0] in _NOT_OPTIONS
    }
    by_line = {k.start_mark.line: (p, k, v) for p, k, v in found if k.start_mark.line not in hidden}
    key_lines = sorted(k.start_mark.line for _, k, _ in found)
    header: list[str] = []
    pending: list[str] = []
    meanings: dict[str, list[str]] = {}
    keys: list[Key] = []
    current: tuple[str, int] | None = None  # the key whose meaning indented comment lines continue
    for i, line in enumerate(lines):
        comment = _COMMENT_LINE.match(line)
        if comment:
            col, body = len(comment.group(1)), comment.group(2).strip()
            nxt = next((n for n in key_lines if n > i), None)
            next_col = len(lines[nxt]) - len(lines[nxt].lstrip()) if nxt is not None else -1
            if current is not None and col > current[1] and col != next_col:
                meanings[current[0]].append(body)
            elif not key_lines or i < key_lines[0]:
                header.append(body)
            else:
                pending.append(body)
                current = None
            continue
        if not line.strip() or i in hidden:
            pending, current = ([] if i in hidden else pending), None
            continue
        if i not in by_line:  # a value's continuation (e.g. the defaults list's items)
            continue
        path, k, v = by_line[i]
        if isinstance(v, yaml.MappingNode) and not v.flow_style:  # a block mapping: its keys follow
            default, end = "", k.end_mark.column
        else:  # the value as written (flow lists and mappings included)
            default = text[v.start_mark.index : v.end_mark.index].strip()
            end = v.end_mark.column if v.end_mark.line == i else len(line)
        inline = _inline_comment(line, end)
        meanings[path] = [*pending, *([inline] if inline else [])]
        pending = []
        current = (path, k.start_mark.column)
        keys.append(Key(path=path, default=" ".join(default.split()), meaning=""))
    for key in keys:
        key.meaning = " ".join(" ".join(meanings[key.path]).split())
    return Option(
        group=group,
        name=name,
        file=file,
        description=" ".join(header),
        keys=keys,
        notes=" ".join(pending),
    )


def _defaults() -> list[tuple[str, str, str]]:
    """``(group, default option, meaning)`` of each group in audit.yaml's defaults list, in order."""
    text = _text(f"{CONFIG_NAME}.yaml")
    listed = yaml.safe_load(text).get("defaults") or []
    comments = {}
    for line in text.splitlines():
        m = _DEFAULTS_ITEM.match(line)
        if m:
            comments[m.group(1)] = (m.group(3) or "").strip()
    out = []
    for item in listed:
        if isinstance(item, dict):
            for g, opt in item.items():
                g = g.split("@", 1)[0].lstrip(
                    "/"
                )  # `group@package` and `/group` name the same folder
                if g.startswith(("override ", "optional ")):
                    g = g.split(" ", 1)[1]
                out.append((g, str(opt), comments.get(g, "")))
    return out


def groups() -> list[Group]:
    """The audit's config groups (audit.yaml's defaults list), each with every option file under it."""
    root = resources.files(CONF_PACKAGE)
    out = []
    for name, default, meaning in _defaults():
        folder = root.joinpath(name)
        files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))
        group = Group(name=name, default=default, meaning=meaning)
        for f in files:
            option = f[: -len(".yaml")]
            group.options.append(parse(_text(name, f), name, option, f"conf/{name}/{f}"))
        out.append(group)
    return out


def top_level() -> Option:
    """audit.yaml's own keys (``promote``, ``quiet``, ...), without the defaults list and ``hydra``."""
    return parse(_text(f"{CONFIG_NAME}.yaml"), "", CONFIG_NAME, f"conf/{CONFIG_NAME}.yaml")


def documented(choices: dict[str, str] | None = None) -> dict[str, Key]:
    """Every key of the audit's config with ``choices`` (group -> option; the defaults otherwise), by full
    path: audit.yaml's own keys, each group (meaning from the defaults list) and its chosen option's keys."""
    out = {k.path: k for k in top_level().keys}
    for g in groups():
        out[g.name] = Key(path=g.name, default="", meaning=g.meaning)
        for k in g.option((choices or {}).get(g.name, g.default)).keys:
            out[f"{g.name}.{k.path}"] = Key(
                path=f"{g.name}.{k.path}", default=k.default, meaning=k.meaning
            )
    return out


# --------------------------------------------------------------------------- --help
def help_groups(*_: Any) -> str:
    """The group list of ``model-audit --help``: each group, its options (``*`` the default), its meaning."""
    gs = groups()
    width = max(len(g.name) for g in gs)
    out = []
    for g in gs:
        names = ", ".join(o.name + ("*" if o.name == g.default else "") for o in g.options)
        out.append(f"  {g.name:<{width}}  {names}")
        if g.meaning:
            out.append(f"  {'':<{width}}    {g.meaning}")
    return "\n".join(out).replace("$", "$$")  # the help template is a string.Template


# --------------------------------------------------------------------------- docs/options.md
def _md(text: str) -> str:
    """``text`` for a Markdown line or table cell: ``| * _ \\ < >`` escaped outside code spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([|*_\\])", r"\\\1", parts[i]).replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _default_md(key: Key) -> str:
    if key.default == "???":
        return "required (`???`)"
    if key.default == "":
        return "a mapping"
    return f"`{key.default}`"


def _keys_md(option: Option, prefix: str) -> list[str]:
    return [f"- `{prefix}{k.path}` = {_default_md(k)}: {_md(k.meaning)}" for k in option.keys]


def markdown() -> str:
    """``docs/options.md``: every group, option file and key of the audit, with defaults and meanings."""
    gs = groups()
    top = top_level()
    out = [
        "# Options of `model-audit`",
        "",
        "<!-- generated from conf/*.yaml by `python -m audit.gate.options > docs/options.md`; do not edit by hand -->",
        "",
        "Every key of the audit's config, with its default and its meaning, taken from the YAML files under "
        "`conf/` and their comments. `model-audit --cfg job` prints the composed config but Hydra drops the "
        "comments; this page keeps them. Choose an option of a group with `model-audit <group>=<option>` "
        "(`model-audit <group>=<option> --cfg job` prints its keys), set a key with `model-audit <key>=<value>`.",
        "",
        "| group | options (default in bold) | what it chooses |",
        "|---|---|---|",
    ]
    for g in gs:
        names = ", ".join(
            f"**`{o.name}`**" if o.name == g.default else f"`{o.name}`" for o in g.options
        )
        out.append(f"| [`{g.name}`](#{g.name}) | {names} | {_md(g.meaning)} |")
    out += ["", f"## {top.file}", "", _md(top.description), "", *_keys_md(top, "")]
    if top.notes:
        out += ["", _md(top.notes)]
    for g in gs:
        out += ["", f"## {g.name}", ""]
        if g.meaning:
            out += [_md(g.meaning[0].upper() + g.meaning[1:]) + ".", ""]
        out += [
            f"Options: {', '.join(f'`{g.name}={o.name}`' for o in g.options)}; default `{g.name}={g.default}`."
        ]
        for o in g.options:
            out += [
                "",
                f"### {g.name}={o.name}",
                "",
                f"`{o.file}`: {_md(o.description)}",
                "",
                *_keys_md(o, f"{g.name}."),
            ]
            if o.notes:
                out += ["", _md(o.notes)]
    return "\n".join(out) + "\n"


def main() -> None:
    """Print :func:`markdown` (``python -m audit.gate.options > docs/options.md``)."""
    print(markdown(), end="")


if __name__ == "__main__":
    main()
