"""The one exception type for errors a user can cause.

The CLI turns an `InfermeterError` into a single line on stderr and a non-zero exit; anything
else that escapes is a bug in infermeter and keeps its traceback.
"""


class InfermeterError(Exception):
    """Bad input from the user: a wrong path, malformed JSON, an unsupported model, a bad size."""
