"""The user-input error: a problem with what the user gave, printed by every entry point as one line."""
import sys


class InputError(ValueError):
    """A problem with what the user gave (data, flags, config, checkpoint, .npz, missing weights): the entry points
    print it as one line, `error: <file>: <problem>`, and exit non-zero (`run_main`). Bugs raise anything else and
    keep their tracebacks."""


class MissingInput(InputError, FileNotFoundError):
    """An `InputError` for a file that is not there."""


def run_main(main) -> None:
    """Runs an entry point's `main()`; an `InputError` ends it with one line, `error: <message>`, and exit code 1."""
    try:
        main()
    except InputError as e:
        sys.exit(f"error: {e}")
