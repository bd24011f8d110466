"""Errors a user can fix: one line that names the file, line or recipe key, and exit code 2."""


class GraftError(Exception):
    """A problem with the user's input (recipe, data, model path). The CLI prints it on one line, exits 2."""

    exit_code = 2


class RecipeError(GraftError):
    """An invalid recipe: the message starts with the key path, e.g. `train.lr: expected a number, got 'fast'`."""


class DataError(GraftError):
    """Unreadable input data: the message starts with `file:line`."""
