"""User-facing errors: one clear line and exit code 2, never a traceback."""
import functools
import sys


class UserError(Exception):
    """A mistake in the user's input, flags or files.

    The message should name the file, the record or line, and the field, e.g.
    ``data/train.jsonl line 7: field 'label': expected an integer or a string``.
    """


EXIT_USER_ERROR = 2


def report_user_errors(main):
    """Decorate a script's ``main(argv)`` so a UserError prints one line and returns 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper
