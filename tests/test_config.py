"""One config type-check kit (:mod:`audit.config`) for the engine's, the gate's and the job's keys:
the same problem reads the same wherever the key lives."""

from __future__ import annotations

import pytest

from audit.config import (
    AuditConfigError,
    check_bool,
    check_choice,
    check_config,
    check_number,
    check_text,
    merge_config,
    value_at,
)
from audit.gate.job import check_job_config

CFG = {"a": {"b": {"flag": "false", "name": "  ", "kind": "x", "ratio": 1.5, "n": 3}}}


def test_value_at_walks_dotted_paths():
    assert value_at(CFG, "a.b.n") == 3
    with pytest.raises(KeyError):
        value_at(CFG, "a.c")


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (
            lambda: check_bool(CFG, "a.b.flag"),
            "a.b.flag must be true or false; got 'false' (a string: write a.b.flag=false without quotes)",
        ),
        (lambda: check_text(CFG, "a.b.name"), "a.b.name must be a non-empty string; got '  '"),
        (
            lambda: check_choice(CFG, "a.b.kind", ("y", "z")),
            "a.b.kind must be one of ['y', 'z']; got 'x'",
        ),
        (
            lambda: check_number(CFG, "a.b.ratio", 0.0, 1.0),
            "a.b.ratio=1.5 is out of range: it must lie in [0.0, 1.0]",
        ),
        (lambda: check_number(CFG, "a.b.flag", 0.0, 1.0), "a.b.flag must be a number; got 'false'"),
    ],
)
def test_each_check_names_the_key_the_value_and_the_fix(check, message):
    with pytest.raises(AuditConfigError) as err:
        check()
    assert str(err.value).startswith(message), str(err.value)


def test_the_checks_return_good_values():
    cfg = {"k": {"on": True, "name": "x", "kind": "y", "ratio": 0.5, "none": None}}
    assert check_bool(cfg, "k.on") is True
    assert check_text(cfg, "k.name") == "x" and check_text(cfg, "k.none", optional=True) is None
    assert check_choice(cfg, "k.kind", ("y",)) == "y"
    assert check_number(cfg, "k.ratio", 0.0, 1.0) == 0.5


def _job_config(**over):
    c = {
        "quiet": False,
        "promote": {"tags": True, "on_champion_fail": "keep", "policy": "newer"},
        "tracking": {"uri": None, "experiment": "model-audit", "run_lease_s": 900},
        "paths": {"reports_dir": "reports"},
        "model": {},
        "probes": {"kind": "folder"},
    }
    for path, value in over.items():
        node = c
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def test_a_quoted_boolean_reads_the_same_in_the_job_and_in_the_gate():
    """The job's keys and the engine's and gate's keys go through one kit: one wording."""
    with pytest.raises(AuditConfigError) as job:
        check_job_config(_job_config(promote__tags="true"))
    with pytest.raises(AuditConfigError) as gate:
        check_config(merge_config({"gate": {"attribution": {"veto": "true"}}}))
    assert (
        str(job.value)
        == "promote.tags must be true or false; got 'true' (a string: write promote.tags=true without quotes)"
    )
    assert str(gate.value) == (
        "gate.attribution.veto must be true or false; got 'true' (a string: write gate.attribution.veto=true without quotes)"
    )


def test_the_job_config_check_passes_a_good_config_and_refuses_a_bad_choice():
    check_job_config(_job_config())
    with pytest.raises(
        AuditConfigError, match=r"promote.policy must be one of \['newer', 'any', 'none'\]; got 'x'"
    ):
        check_job_config(_job_config(promote__policy="x"))
