"""The one exception type headlens raises for bad input; the CLI prints its message without a traceback."""

import numbers


class HeadlensError(Exception):
    """A user-facing error whose message says what went wrong and what to do."""


def check_count(name: str, value, *, minimum: int = 1, why: str = "") -> int:
    """``value`` as an ``int`` when it is a whole number >= ``minimum`` (numpy integers too, never a bool).

    Sizes, seeds and step counts reach ``range``, ``int()`` or an index, where 1.5 would silently become 1 or fail
    deep inside a run; anything else gets one error naming ``name`` (and ``why``, what the number counts).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise HeadlensError(f"{name} must be an integer >= {minimum} (got {value!r})" + (f": {why}" if why else ""))
    return int(value)
