"""The one exception type the converter raises for bad input: its message is a one-line fix."""


class StarKVError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
