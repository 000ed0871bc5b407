"""The one exception type for mistakes a user can fix; the CLI prints it as a one-line error, exit 2."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. Never shown with a traceback."""
