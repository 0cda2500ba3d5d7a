"""``python -m audit``: the audit gate (same as the ``model-audit`` command)."""

from audit.gate.cli import main

if __name__ == "__main__":
    main()
