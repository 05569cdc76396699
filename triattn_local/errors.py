"""One exception type for bad input, so the CLI and the server can turn it into a one-line message."""


class UserError(Exception):
    """Bad input from the user (path, flag, file). The CLI prints it as one line and exits with code 2."""
