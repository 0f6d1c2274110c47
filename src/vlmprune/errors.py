"""The one exception type a user can cause; the CLI prints its message and exits 2."""


class VlmpruneError(Exception):
    """A user-fixable problem. The message is one line saying what to change."""


class SpecError(VlmpruneError, ValueError):
    """A SPEC string (``name:key=value,...``) that does not parse or names nothing known."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: how a failure is named where the full traceback goes elsewhere."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
