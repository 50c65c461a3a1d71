"""One error type for every problem the user can fix: the CLI prints it as one line and exits 2."""


class MixqError(Exception):
    """A user-facing error: bad input, missing file, infeasible target."""

    exit_code = 2
