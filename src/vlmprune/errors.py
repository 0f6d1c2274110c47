"""The one exception type a user can cause; the CLI prints its message and exits 2."""


class VlmpruneError(Exception):
    """A user-fixable problem. The message is one line saying what to change."""


class SpecError(VlmpruneError, ValueError):
    """A SPEC string (``name:key=value,...``) that does not parse or names nothing known."""
