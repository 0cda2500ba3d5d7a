"""The CI workflow's gate job, run here step by step as GitHub Actions would run it (docs/ci.md).

``.github/workflows/model-audit-gate.yml`` is parsed; the gate job's ``run:`` steps run
with ``bash --noprofile --norc -eo pipefail`` (GitHub's ``shell: bash``) in a tmp
workspace, in order, honouring ``if: always()``. Each step gets a fresh
``GITHUB_OUTPUT`` file and the shared ``GITHUB_STEP_SUMMARY``; the ``${{ }}``
expressions of the ``env:`` blocks (``inputs.*``, ``secrets.*``,
``steps.<id>.outputs.*``) are filled in the way GitHub fills them (a missing value is
the empty string). Skipped, with the reason: ``uses:`` steps (checkout, setup-python,
upload-artifact: GitHub's own actions) and the install step, which is exactly ``make
install`` (the workspace links the venv that ``make install`` built). The candidate
lives in a real SQLite registry; ``model-audit`` is the real command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _jobkit import colour_folder, registry
from _toy_models import ColourReader, ContextReader
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
WORKFLOW = REPO / ".github" / "workflows" / "model-audit-gate.yml"
SMALL = (
    "engine.methods=[gradcam] engine.attribution_probes=16 engine.sanity_probes=0 engine.steps=4"
)
ALLOW = "model.allowed_targets=[audit.models.*,_toy_models.*]"
_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_SKIPPED_RUNS = {
    "make install": "identical to `make install`, which built the venv this workspace links"
}


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _on(wf: dict) -> dict:
    return wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True


@dataclass
class Job:
    steps: list[dict]
    outputs: dict[str, dict[str, str]]
    summary: str
    log: str
    failed: bool
    exit_codes: list[tuple[str, int]]

    @property
    def annotations(self) -> list[str]:
        return [ln for ln in self.log.splitlines() if ln.startswith("::error")]


def _evaluate(value: str, inputs: dict, secrets: dict, outputs: dict) -> str:
    def one(m: re.Match) -> str:
        expr = m.group(1)
        parts = expr.split(".")
        if parts[0] == "inputs" and len(parts) == 2:
            return str(inputs.get(parts[1], ""))
        if parts[0] == "secrets" and len(parts) == 2:
            return str(secrets.get(parts[1], ""))
        if parts[0] == "steps" and len(parts) == 4 and parts[2] == "outputs":
            return outputs.get(parts[1], {}).get(parts[3], "")
        raise AssertionError(
            f"the local runner does not evaluate ${{{{ {expr} }}}}; keep env expressions simple"
        )

    return _EXPR.sub(one, str(value))


def _read_output(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        assert sep, (
            f"GITHUB_OUTPUT line without '=': {line!r} (multi-line values are not used here)"
        )
        out[key] = value
    return out


def run_gate_job(
    workspace: Path, inputs: dict, secrets: dict, extra_env: dict | None = None
) -> Job:
    """Run the gate job's steps in ``workspace``; return what GitHub would show."""
    wf = _workflow()
    job = wf["jobs"]["gate"]
    assert job["defaults"]["run"]["shell"] == "bash"
    dispatch = _on(wf)["workflow_dispatch"]["inputs"]
    inputs = {k: inputs.get(k, spec.get("default", "")) for k, spec in dispatch.items()}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GITHUB_"))}
    base.update(extra_env or {})
    base.update({k: _evaluate(v, inputs, secrets, {}) for k, v in job.get("env", {}).items()})
    base["RUNNER_TEMP"] = str(workspace / "_runner_temp")
    (workspace / "_runner_temp").mkdir(exist_ok=True)
    summary = workspace / "_step_summary.md"
    summary.write_text("")
    outputs: dict[str, dict[str, str]] = {}
    log, failed, codes = [], False, []
    for n, step in enumerate(job["steps"]):
        if "uses" in step:
            continue
        script = step["run"]
        if script.strip() in _SKIPPED_RUNS:
            continue
        assert "${{" not in script, (
            f"step {step.get('name')}: an expression inside run: can inject shell"
        )
        condition = step.get("if")
        assert condition in (None, "always()"), (
            f"the local runner knows only `if: always()`; got {condition!r}"
        )
        if failed and condition is None:
            continue
        out_file = workspace / f"_output_{n}"
        out_file.write_text("")
        env = dict(base)
        env.update(
            {k: _evaluate(v, inputs, secrets, outputs) for k, v in step.get("env", {}).items()}
        )
        env.update(
            GITHUB_OUTPUT=str(out_file),
            GITHUB_STEP_SUMMARY=str(summary),
            GITHUB_WORKSPACE=str(workspace),
        )
        path = workspace / f"_step_{n}.sh"
        path.write_text(script)
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", path.name],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
        log.append(done.stdout)
        codes.append((step.get("name", f"step {n}"), done.returncode))
        if "id" in step:
            outputs[step["id"]] = _read_output(out_file)
        failed = failed or done.returncode != 0
    return Job(job["steps"], outputs, summary.read_text(), "\n".join(log), failed, codes)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """'toy' v1 reads the colour of the square (PASS on colour probes), v2 the background
    (FAIL on snow-wolf probes); a colour probe folder beside them."""
    folder = tmp_path_factory.mktemp("ci-registry")
    uri = registry(folder, models=(ColourReader, ContextReader), name="toy")
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias("toy", "candidate", "1")
    colour_folder(folder, n_per_group=32)
    return folder


@pytest.fixture
def workspace(template, tmp_path):
    """A fresh checkout-like folder: the venv linked, a copy of the registry."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".venv").symlink_to(REPO / ".venv")
    shutil.copyfile(template / "mlflow.db", ws / "mlflow.db")
    return ws


def _secrets(ws: Path) -> dict:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}


def _env() -> dict:
    return {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_workflow_is_dispatched_by_hand_with_documented_inputs():
    wf = _workflow()
    assert set(_on(wf)) == {"workflow_dispatch"}
    assert set(_on(wf)["workflow_dispatch"]["inputs"]) == {"model_name", "version", "overrides"}
    assert wf["permissions"] == {"contents": "read"}
    job = wf["jobs"]["gate"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    runs = [s["run"].strip() for s in job["steps"] if "run" in s]
    assert "make install" in runs, "the install step is `make install`, as on a developer's machine"
    for doc in ("docs/ci.md",):
        assert doc in WORKFLOW.read_text() and (REPO / doc).is_file()


@pytest.mark.slow  # a full audit of 128 colour probes in a subprocess; the FAIL test below is the fast one
def test_pass_promotes_and_the_job_succeeds(workspace, template):
    job = run_gate_job(
        workspace,
        {
            "model_name": "toy",
            "version": "candidate",
            "overrides": f"probes=folder probes.path={template / 'colour-probes-32'} {ALLOW} {SMALL}",
        },
        _secrets(workspace),
        _env(),
    )
    gate = job.outputs["gate"]
    assert gate["code"] == "0", job.log
    assert gate["verdict"] == "PASS" and gate["uri"] == "models:/toy@candidate"
    assert not job.failed and not job.annotations, job.log
    report = (workspace / "gate-report" / "report.md").read_text()
    assert "**PASS**" in report and report in job.summary
    assert {"report.html", "report.json", "report.md"} <= {
        p.name for p in (workspace / "gate-report").iterdir()
    }
    client = MlflowClient(_secrets(workspace)["MLFLOW_TRACKING_URI"])
    assert str(client.get_registered_model("toy").aliases.get("champion")) == "1"


def test_fail_is_published_then_fails_the_job_with_exit_1(workspace):
    """The brief's small snow-wolf audit on the background reader: FAIL, report in the summary, exit 1."""
    overrides = f"probes.n_per_group=32 probes.size=32 {ALLOW} {SMALL}"
    job = run_gate_job(
        workspace,
        {"model_name": "toy", "version": "2", "overrides": overrides},
        _secrets(workspace),
        _env(),
    )
    assert job.outputs["gate"]["code"] == "1", job.log
    assert job.outputs["gate"]["verdict"] == "FAIL"
    report = (workspace / "gate-report" / "report.md").read_text()
    assert "**FAIL**" in report and report in job.summary
    assert job.failed and job.exit_codes[-1] == ("Pass or fail the job on the verdict", 1), (
        job.exit_codes
    )
    assert any(
        "FAIL: promotion of models:/toy/2 is blocked (exit 1)" in a for a in job.annotations
    ), job.log
    assert (
        "champion"
        not in MlflowClient(_secrets(workspace)["MLFLOW_TRACKING_URI"])
        .get_registered_model("toy")
        .aliases
    )


def test_a_bad_candidate_is_an_error_with_exit_2(workspace):
    """An unknown alias: exit 2, the error in the summary and the annotation. What model-audit
    printed (it holds names from files) ran with workflow commands switched off."""
    job = run_gate_job(
        workspace, {"model_name": "toy", "version": "nosuch"}, _secrets(workspace), _env()
    )
    assert job.outputs["gate"]["code"] == "2", job.log
    assert job.exit_codes[-1][1] == 2 and job.failed
    assert "has no alias 'nosuch'" in job.outputs["gate"]["reason"]
    assert "No report" in job.summary and "has no alias 'nosuch'" in job.summary
    assert any(
        a.startswith("::error title=model-audit gate::error (exit 2):") and "nosuch" in a
        for a in job.annotations
    ), job.log
    log = job.log.splitlines()
    stop = next(i for i, ln in enumerate(log) if ln.startswith("::stop-commands::"))
    token = log[stop].split("::")[2]
    resume = log.index(f"::{token}::")
    assert len(token) == 32 and any("model-audit: error:" in ln for ln in log[stop:resume])
    assert not any(ln.startswith("::error") for ln in log[stop:resume])


def test_missing_secret_and_shell_in_inputs_are_refused_before_anything_runs(workspace):
    job = run_gate_job(workspace, {"model_name": "toy", "version": "1"}, {}, _env())
    assert (
        job.outputs["gate"]["code"] == "2"
        and "MLFLOW_TRACKING_URI is not set" in job.outputs["gate"]["reason"]
    )
    assert job.exit_codes[-1][1] == 2 and "MLFLOW_TRACKING_URI is not set" in job.summary
    for version in ("1; touch pwned", "$(touch pwned)", "a@b"):
        job = run_gate_job(
            workspace, {"model_name": "toy", "version": version}, _secrets(workspace), _env()
        )
        assert job.outputs["gate"]["code"] == "2", (version, job.log)
        assert "version number (3) or an alias" in job.outputs["gate"]["reason"]
    job = run_gate_job(
        workspace, {"model_name": "toy`touch pwned`", "version": "1"}, _secrets(workspace), _env()
    )
    assert job.outputs["gate"]["code"] == "2"
    assert not (workspace / "pwned").exists()
    assert not (workspace / "gate-reports").exists(), "nothing was audited"
