"""``rustinfer`` entry point: subcommands serve, chat, generate, bench, plugins."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rustinfer.cli import bench, chat, generate, plugins_cmd, serve
from rustinfer.errors import RustinferError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rustinfer", description="LLM inference engine")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    chat.add_parser(sub)
    generate.add_parser(sub)
    bench.add_parser(sub)
    plugins_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        follower = _torchrun_follower(args)
        if follower is not None:
            return follower()
        return int(args.func(args) or 0)
    except (RustinferError, ValueError, FileNotFoundError) as exc:
        # Deliberate errors carry a message that says what to fix; no traceback for those.
        print(f"rustinfer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _torchrun_follower(args: argparse.Namespace) -> Callable[[], int] | None:
    """Under torchrun, every rank but 0 holds a shard for rank 0's engine instead of running the
    command (rank 0 serves, generates or benchmarks for all of them)."""
    if not hasattr(args, "model"):  # a command that loads no model
        return None
    from rustinfer.distributed.workers import (
        follow_as_torchrun_rank,
        spec_from_options,
        torchrun_rank,
    )

    launched = torchrun_rank()
    if launched is None or launched[0] == 0:
        return None
    # serve reads its flags over the environment over defaults: the same settings as rank 0.
    options = serve.settings_from_args(args) if args.command == "serve" else args
    spec = spec_from_options(options)
    return lambda: follow_as_torchrun_rank(spec)


if __name__ == "__main__":
    sys.exit(main())
