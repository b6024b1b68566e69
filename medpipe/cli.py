"""What every stage script shares: logging set-up and a clean exit on a user-facing error."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from medpipe.config import ParamsError
from medpipe.download import DownloadError
from medpipe.imaging import ImageDecodeError
from medpipe.preprocess import ArchiveError
from medpipe.registry import RegistryError

# Errors caused by the user's data or parameters: print the message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ParamsError, RegistryError, DownloadError, ArchiveError, ImageDecodeError, FileNotFoundError,
)


def register_user_error(*errors: type[BaseException]) -> None:
    global USER_ERRORS
    USER_ERRORS = tuple(dict.fromkeys((*USER_ERRORS, *errors)))


def run(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
