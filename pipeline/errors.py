"""One exception type for problems a user can fix; the CLI prints its message as one sentence."""


class UserError(Exception):
    """Bad input or options: the message names the input and the fix."""

