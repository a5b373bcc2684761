"""User-facing errors: one clear line and exit code 2, never a traceback."""
import errno
import functools
import reprlib
import sys


class UserError(Exception):
    """A mistake in the user's input, flags or files.

    The message should name the file, the record or line, and the field, e.g.
    ``data/train.jsonl line 7: field 'label': expected an integer or a string``.
    """


EXIT_USER_ERROR = 2
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
_SHORT_REPR.maxlevel = 2  # a nested value is cut at two levels: an alias-bomb list is not walked


def short_repr(value):
    """A short repr of any value for an error line: a megabyte string or an alias-bomb list stays short
    (and is not walked whole)."""
    return _SHORT_REPR.repr(value)
# A full disk, a file-size limit or a quota: the user's to fix even when the OS names no file.
DISK_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def report_user_errors(main):
    """Decorate a script's ``main(argv)`` so a UserError prints one line and returns 2.

    An OSError about a path (a directory where a file belongs, a path under a regular
    file, no permission, a full disk) is the user's to fix too, so it gets the same one
    line naming the path instead of a traceback.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as error:
            _close_progress_bars()
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR
        except OSError as error:
            if error.filename is None and error.errno not in DISK_ERRORS:  # a real bug: keep the traceback
                raise
            _close_progress_bars()
            where = f"{error.filename}: " if error.filename is not None else "while writing: "
            print(f"error: {where}{error.strerror or error}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper


def _close_progress_bars():
    """Finish any tqdm bar an aborted loop left open, so the error starts a line of its own."""
    tqdm_class = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    for bar in list(getattr(tqdm_class, "_instances", [])):
        bar.close()
