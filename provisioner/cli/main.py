"""The `provisioner` command. Errors become exit statuses here, and only here (by
`core.errors.exit_status`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from provisioner.cli.common import (
    EXIT_CODES_HELP,
    TerminalProgress,
    print_result,
    progress_line,
    setup_logging,
    through_daemon,
)
from provisioner.cli.parser import build_parser
from provisioner.cli.queueing import print_queue
from provisioner.core.errors import (
    EXIT_INTERRUPTED,
    ProvisionerError,
    exit_status,
)

__all__ = [
    "EXIT_CODES_HELP",
    "TerminalProgress",
    "build_parser",
    "main",
    "print_queue",
    "print_result",
    "progress_line",
    "setup_logging",
    "through_daemon",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ProvisionerError as e:
        sys.stdout.flush()
        print(f"provisioner: {e.one_line()}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        print("provisioner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
