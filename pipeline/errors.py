"""One exception type for problems a user can fix; the CLI prints its message as one sentence."""

_WORKER_MARK = "pipeline.errors.UserError: "


class UserError(Exception):
    """Bad input or options: the message names the input and the fix."""

    def __init__(self, message: str = ""):
        # torch re-raises a data-loader worker's exception as exc_type("Caught ... Original Traceback ...
        # UserError: <message>"): keep only the sentence, so the CLI still prints one
        if isinstance(message, str) and message.startswith("Caught UserError") and _WORKER_MARK in message:
            message = message.rsplit(_WORKER_MARK, 1)[1].strip()
        super().__init__(message)
