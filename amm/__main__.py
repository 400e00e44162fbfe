"""Command line: ``python -m amm demo [options]``"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m amm demo [--help | options]")
        return 0 if argv else 2
    command, *rest = argv
    if command == "demo":
        from amm import demo

        demo.main(rest)
        return 0
    print(f"unknown command {command!r}; expected: demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
