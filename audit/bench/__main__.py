"""Run every benchmark section, or the ones named: ``python -m audit.bench [data] [methods] [metrics] [memory] [callbacks] [floors] [scaling] [export]``."""

from __future__ import annotations

import importlib
import sys

SECTIONS = ("data", "methods", "metrics", "memory", "callbacks", "floors", "scaling", "export")


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown bench section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"\n=== bench: {name} ===", flush=True)
        importlib.import_module(f"audit.bench.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
