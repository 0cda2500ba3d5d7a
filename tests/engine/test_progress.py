"""Progress lines from inside the audit's long loops (audit/engine/progress.py)."""

from __future__ import annotations

import re
import threading

from audit.datasets import snow_wolf
from audit.engine import progress
from audit.engine.progress import reporting, task
from audit.models import SmallCNN
from audit.pipeline import run_audit


def test_a_task_reports_only_inside_a_reporting_block():
    lines: list[str] = []
    with task("silent", 10) as t:  # no reporter: nothing, however often
        for _ in range(10):
            t.advance()
    with reporting(lines.append, every=0.0):
        with task("curves", 100, "forwards") as t:
            for _ in range(4):
                t.advance(25)
    assert lines[:3] == [
        line
        for line in lines[:3]
        if re.fullmatch(r"  curves: \d+/100 forwards \(\d+%\), \d+ s, ~\d+ s left", line)
    ]
    assert (
        len(lines) == 4
    )  # 25, 50, 75 of 100, then the closing line (the last advance prints none)
    assert lines[-1].startswith("  curves: 100 forwards in ")


def test_reporting_is_per_thread():
    lines: list[str] = []

    def work():
        with task("elsewhere", 2) as t:
            t.advance(1)

    with reporting(lines.append, every=0.0):
        th = threading.Thread(target=work)
        th.start()
        th.join()
    assert lines == []  # a training thread's callbacks never print through the audit job's reporter


def test_run_audit_shows_progress_inside_its_stages(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # every chunk prints
    lines: list[str] = []
    probes = snow_wolf.probe_set(4, size=32, seed=1)
    run_audit(
        SmallCNN(num_classes=2, widths=(8, 16)).eval(),
        probes,
        {"engine": {"max_batch": 8, "sanity_probes": 4, "attribution_probes": 16}},
        progress=lines.append,
    )
    text = "\n".join(lines)
    for inside in (
        "  predictions: 8/16 probes",
        "  attribution: 8/16 probes",  # over the blocks of max_batch explained probes
        "  gradcam maps: 8 probes in",  # a block's maps are one chunk: its line comes at its end
        "  lrp maps: 8 probes in",
        "  curves (deletion, lerf; zero baseline): ",
        "  curves (deletion, lerf; blur baseline): ",
        "  sanity (gradcam, full): 1/2 explanations",
    ):
        assert inside in text, (inside, text)
    assert "s left" in text
