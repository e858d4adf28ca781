"""The one exception type that command-line entry points turn into a single clear line."""


class UserError(Exception):
    """Bad input, bad configuration or a bad file: the message says what and where.

    Entry points print ``<prog>: error: <message>`` and exit with status 2, no traceback.
    """
