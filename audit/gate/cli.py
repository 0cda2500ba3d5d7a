"""The ``model-audit`` command (also ``python -m audit``): its subcommands, then the audit job.

``model-audit serve ...`` runs the webhook receiver (:func:`audit.gate.serve.main`),
``model-audit verify ...`` checks a registry version's verdict (:func:`audit.gate.verify.main`),
``model-audit plan ...`` prints what an audit would cost (:func:`audit.gate.plan.main`),
``--version`` prints ``model-audit <version>``; anything else is the audit job, a Hydra app
(:func:`audit.gate.job.main`). The dispatch has its own module so that ``serve``, which
checks its overrides as the job does, imports the job without the job importing it.
"""

from __future__ import annotations

import sys

from audit import __version__
from audit.gate import job
from audit.gate.job import EXIT_ERROR, EXIT_PASS

__all__ = ["main"]


def main() -> None:
    """Console entry point: a subcommand, ``--version``, or the audit job (exit 0 / 1 / 2)."""
    argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        sys.exit(_serve(argv[1:]))
    if argv[:1] == ["verify"]:
        sys.exit(_verify(argv[1:]))
    if argv[:1] == ["plan"]:
        sys.exit(_plan(argv[1:]))
    if "--version" in argv:
        print(f"model-audit {_version()}", flush=True)
        sys.exit(EXIT_PASS)
    job.main()


def _version() -> str:
    """The installed distribution's version (``audit.__version__`` when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("model-audit")
    except PackageNotFoundError:
        return __version__


def _serve(argv: list[str]) -> int:
    """``model-audit serve ...``: :func:`audit.gate.serve.main`, imported only for this command."""
    try:
        from audit.gate.serve import main as serve_main
    except ModuleNotFoundError as err:
        if err.name != "audit.gate.serve":
            raise
        print(
            "model-audit: error: this installation has no `serve` command (no module audit.gate.serve); "
            "reinstall model-audit",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_ERROR
    return serve_main(argv)


def _verify(argv: list[str]) -> int:
    """``model-audit verify ...``: :func:`audit.gate.verify.main`, imported only for this command."""
    from audit.gate.verify import main as verify_main

    return verify_main(argv)


def _plan(argv: list[str]) -> int:
    """``model-audit plan ...``: :func:`audit.gate.plan.main`, imported only for this command."""
    from audit.gate.plan import main as plan_main

    return plan_main(argv)


if __name__ == "__main__":
    main()
