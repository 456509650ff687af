"""The one exception type for mistakes a user can fix; cli.py prints it as a single line."""


class UserError(Exception):
    """A configuration, data or path problem, with a message that says what to do."""
