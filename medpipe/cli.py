"""What every stage script and command shares: logging set-up, a clean exit on a user-facing error, and
SIGTERM unwinding like Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medpipe import config
from medpipe.errors import UserError

P = TypeVar("P")


def exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM (``kill``, a batch scheduler or CI timeout, torchrun stopping its other ranks) unwinds like Ctrl-C, so
    every atomic write removes its temporary output instead of leaving it inside a DVC-tracked folder."""
    sys.exit(128 + signum)


def run(main: Callable[[], None]) -> None:
    """Run ``main``; a :class:`UserError` (or a missing input file) prints one line and exits with status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        main()
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def stage_main(run_stage: Callable[[dict, P], object], paths_type: type[P], description: str | None) -> None:
    """The whole ``main`` of a stage script: a command line that mirrors the stage's ``cmd:`` in dvc.yaml.

    Every field of ``paths_type`` (a dataclass) becomes an option (``out_dir`` -> ``--out-dir``), typed by its
    annotation and required unless the field has a default, so a path is written in ``dvc.yaml`` only (in ``cmd`` and in deps/outs);
    ``--params`` picks the params file. Then ``run_stage(params, paths)`` runs under :func:`run`.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path(config.PARAMS_FILE), help="the params file")
    hints = typing.get_type_hints(paths_type)
    for field in dataclasses.fields(paths_type):
        kind, optional = hints[field.name], field.default is not dataclasses.MISSING
        if optional:  # `x: int | None = None`: an option that may be left out
            kind = next(a for a in typing.get_args(kind) or (kind,) if a is not type(None))
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind,
                            required=not optional, default=field.default if optional else None)

    def main() -> None:
        args = vars(parser.parse_args())
        params = config.load_params(args.pop("params"))
        run_stage(params, paths_type(**args))

    run(main)
