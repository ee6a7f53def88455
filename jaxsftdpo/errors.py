"""The one exception type for bad user input.

CLIs catch it, print its message as one line and exit with status 2.
"""


class UserError(Exception):
    """Input the user can fix: the message says what is wrong and how to fix it."""
