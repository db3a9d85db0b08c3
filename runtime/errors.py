"""The user-input error: a problem with what the user gave, printed by every entry point as one line; and the same
error out of a DataLoader worker, without the traceback torch wraps around it."""
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


def worker_errors(loader):
    """The loader's batches; an InputError from a DataLoader worker (a truncated image) is raised again with its
    message alone, not the worker's traceback that torch puts in it."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except InputError as e:
            message = str(e)
            if message.startswith("Caught "):  # "Caught X in DataLoader worker ...", the traceback, "module.X: ..."
                raise type(e)(message.rstrip().splitlines()[-1].split(": ", 1)[-1]) from None
            raise
        yield batch
