"""`python -m epic_ext.demo` (behind `make demo`): the embedded demo (see epic_ext.demo.pipeline). Every option is
checked before the data is written and anything heavy starts; a user error is one line and exit status 2."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..cli import configure_logging, HelpFormatter, Parser, UsageError, run_main
from ..compress import available as available_methods
from ..schedules import SCHEDULES


def build_parser() -> Parser:
    parser = Parser(prog="python -m epic_ext.demo", formatter_class=HelpFormatter,
                    description="EPIC on the embedded pretrained tiny LLaVA: accuracy at full and compressed visual "
                                "tokens, a short EPIC run through `python -m epic_ext.train`'s path (DeepSpeed), the "
                                "recovery, costs and a plot.")
    parser.add_argument("--output-dir", default="runs/demo", help="data, the EPIC run, the summary and the plot")
    parser.add_argument("--steps", type=int, default=2000, help="steps of the EPIC run from the pretrained model")
    parser.add_argument("--method", default=None,
                        help=f"compressor trained with, one of {available_methods()} (default: the card's, random)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="tcd", help="compression schedule of the EPIC run")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the EPIC run")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, schedule draws and Random drops")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    configure_logging()
    options = build_parser().parse_args(argv)
    if options.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {options.steps}")
    if options.method is not None and options.method not in available_methods():
        raise UsageError(f"--method must be one of {available_methods()}, got {options.method!r}")
    if os.path.exists(options.output_dir) and not os.path.isdir(options.output_dir):
        raise UsageError(f"--output-dir: {options.output_dir} is a file")
    from .pipeline import run_demo  # noqa: PLC0415

    return run_demo(options)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m epic_ext.demo`: a user error is one line on stderr and exit status 2."""
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
