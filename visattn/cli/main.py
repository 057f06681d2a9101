"""Entry point of the ``visattn`` command.

``visattn {info,bench,train,validate,benchmark-models,generate} ...``
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import bench, benchmark_models, generate, info, train, validate

    parser = argparse.ArgumentParser(prog="visattn", description="Efficient attention for vision models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in (info, bench, train, validate, benchmark_models, generate):
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
