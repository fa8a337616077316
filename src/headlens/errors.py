"""The one exception type headlens raises for bad input; the CLI prints its message without a traceback."""

import inspect
import operator


class HeadlensError(Exception):
    """A user-facing error whose message says what went wrong and what to do."""


def is_whole(value) -> bool:
    """Whether ``value`` is one integer: an int, a numpy integer or a 0-d integer tensor; never a bool (of any kind),
    a float, a string or a one-element array (``operator.index`` takes ``torch.tensor([3])`` and ``torch.tensor(True)``)."""
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0 or "bool" in str(getattr(value, "dtype", "")):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_count(value, minimum: int = 1) -> bool:
    """Whether ``value`` is a whole number (:func:`is_whole`) >= ``minimum``."""
    return is_whole(value) and operator.index(value) >= minimum


def check_count(name: str, value, *, minimum: int = 1, why: str = "") -> int:
    """``value`` as an ``int`` when it is a whole number >= ``minimum`` (:func:`is_whole`).

    Sizes, seeds and step counts reach ``range``, ``int()`` or an index, where 1.5 would silently become 1 or fail
    deep inside a run; anything else gets one error naming ``name`` (and ``why``, what the number counts).
    """
    if not is_count(value, minimum):
        raise HeadlensError(f"{name} must be an integer >= {minimum} (got {value!r})" + (f": {why}" if why else ""))
    return operator.index(value)


def check_model(model, name: str = "model"):
    """``model`` when it is a TransformerLens ``HookedTransformer``, else one error naming ``name`` (a path or a model
    name passed where a loaded model belongs used to fail deep inside as an AttributeError)."""
    from transformer_lens import HookedTransformer  # here, so the registry's import of this module stays light

    if not isinstance(model, HookedTransformer):
        shown = repr(model) if isinstance(model, (str, type(None))) else type(model).__name__
        raise HeadlensError(
            f"{name} must be a loaded model (headlens.load_model(...) or headlens.tiny_model(...)), got {shown[:80]}"
        )
    return model


def non_defaults(fn, **values) -> list[str]:
    """The names among ``values`` that differ from ``fn``'s defaults for them: arguments a caller set, to refuse beside
    another argument that makes them moot (the defaults are read from the signature, so they cannot drift)."""
    params = inspect.signature(fn).parameters
    return [name for name, value in values.items() if value != params[name].default]
