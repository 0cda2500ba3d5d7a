"""The audit-vs-floors benchmark: its counts follow the engine config, and it runs end to end."""

from __future__ import annotations

from audit.bench import floors
from audit.defaults import default_config


def test_floor_counts_follow_the_engine():
    engine = dict(default_config()["engine"])
    engine.update(methods=["gradcam", "lrp"], steps=8, also_baselines=["blur"])
    need = floors.floors(engine, n_probes=100, n_explained=40, n_sanity=4)
    assert need["behaviour"] == {"forward": 100, "forward_backward": 0}
    # per explained probe and baseline: 2 shared images + 2 methods x 2 curves x 7 inner steps
    assert need["attribution"] == {"forward": 2 * 40 * (2 + 2 * 2 * 7), "forward_backward": 2 * 40}
    assert need["sanity"] == {"forward": 0, "forward_backward": 2 * 2 * 4}


def test_measure_runs_the_default_audit_and_times_every_stage():
    res = floors.measure("small_cnn", "cpu", size=32, per_group=2)
    assert res["probes"] == 8 and res["explained"] == 8
    assert set(res["stages"]) >= {"behaviour", "attribution", "sanity"}
    assert res["wall"] > 0 and res["floor"] > 0
    assert (
        res["unit"]["forward"]
        <= res["unit"]["forward_plain"]
        < res["unit"]["forward_backward"] * 10
    )
    assert res["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
