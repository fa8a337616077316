"""The test suite's runtime type checker: jaxtyping shapes/dtypes only.

``jaxtyping.install_import_hook("headlens", "shapecheck.shapes_only")`` (tests/conftest.py) wraps every headlens
function in ``jaxtyped(typechecker=shapes_only)``: the tensors a signature annotates with ``Float[Tensor, "batch
pos"]`` etc. must match, with dimension names bound consistently across the call. Other hints (Literal choices,
head lists) are left to headlens' own validation, which answers bad input with a HeadlensError.
"""

import functools
import inspect
import typing

import jaxtyping
import torch

from headlens.errors import HeadlensError


class ShapeError(HeadlensError, TypeError):
    """A tensor whose shape or dtype is not what the signature says (a HeadlensError, as bad input is)."""


def _describe(hint) -> str:
    return f"{'/'.join(hint.dtypes)} tensor [{', '.join(hint.dim_str.split())}]"


def _array_hint(hint):
    """The jaxtyping array type inside ``hint`` (also ``X | None``), else None."""
    if isinstance(hint, type) and issubclass(hint, jaxtyping.AbstractArray):
        return hint
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        arrays = [_array_hint(a) for a in typing.get_args(hint)]
        arrays = [a for a in arrays if a is not None]
        return arrays[0] if len(arrays) == 1 else None
    return None


def shapes_only(fn):
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve here is not a shape
        return fn
    checked = {name: a for name, hint in hints.items() if (a := _array_hint(hint)) is not None}
    if not checked:
        return fn
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            hint = checked.get(name)
            if hint is not None and isinstance(value, torch.Tensor) and not isinstance(value, hint):
                raise ShapeError(
                    f"{fn.__qualname__}: {name} must be a {_describe(hint)}, got {tuple(value.shape)} {value.dtype}"
                )
        out = fn(*args, **kwargs)
        hint = checked.get("return")
        if hint is not None and isinstance(out, torch.Tensor) and not isinstance(out, hint):
            raise ShapeError(f"{fn.__qualname__} returned {tuple(out.shape)} {out.dtype}, not a {_describe(hint)}")
        return out

    return wrapper
