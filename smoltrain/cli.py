"""Command line: argument parsing only, one `cmd_<verb>` function per verb, each a thin call into the
library function of the same name. User mistakes (SmoltrainError) become one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from smoltrain.errors import SmoltrainError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


# ----------------------------------------------------------------------------- verbs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoltrain", description="Train small language models the SmolLM3 way.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("config", help="print the resolved config of a recipe")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    return parser


def cmd_config(args) -> int:
    from smoltrain.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


# ----------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    try:
        return args.func(args) or 0
    except SmoltrainError as e:
        print(f"smoltrain {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"smoltrain {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
