"""Progress bars with one switch and clean logs.

``tqdm`` here is a drop-in for ``tqdm.auto.tqdm`` with three differences, each for a complaint that was real:

- when its stream is not a terminal (a pipe, a log file, a notebook kernel run by nbclient) it prints
  plain lines (``census: 12/24 [00:05<00:05]``) every ``PLAIN_INTERVAL`` seconds instead of carriage
  returns and cursor-moving escape codes, so nested bars leave no ``[A`` in a log;
- it never uses the ipywidgets front end, so notebooks show no ``TqdmWarning: IProgress not found``;
- :func:`set_enabled` (the CLI's ``--no-progress``) silences it and the bars of transformers,
  huggingface_hub and datasets, also those of libraries imported later (through their environment switches).

It also makes one Ctrl-C stop a command (:func:`catch_interrupts`). The module imports only tqdm, so the CLI can
import it at start-up.
"""

from __future__ import annotations

import contextlib
import os
import sys

from tqdm.std import tqdm as _tqdm

PLAIN_INTERVAL = 5.0
"""Seconds between two plain progress lines when the stream is not a terminal."""

_ENABLED = True
_QUIET_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def enabled() -> bool:
    """Whether headlens shows progress bars (False after ``set_enabled(False)``)."""
    return _ENABLED


def set_enabled(on: bool) -> None:
    """Turn every progress bar of this process on or off: headlens' own and third-party ones.

    Libraries already imported are switched directly; libraries imported later read the environment
    variables set here (``HF_HUB_DISABLE_PROGRESS_BARS``, ``HF_DATASETS_DISABLE_PROGRESS_BARS``, ``TQDM_DISABLE``).
    """
    global _ENABLED
    _ENABLED = bool(on)
    for name in _QUIET_ENV:
        if on:
            os.environ.pop(name, None)
        else:
            os.environ[name] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if on else disable_progress_bars)()
    if "datasets" in sys.modules:
        from datasets.utils.logging import disable_progress_bar, enable_progress_bar

        (enable_progress_bar if on else disable_progress_bar)()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


_DROPPED = False


@contextlib.contextmanager
def catch_interrupts():
    """Within it, one Ctrl-C stops the work even where Python drops it.

    CPython cannot raise an exception out of a ``__del__`` (zipfile's, numpy's ``.npz`` reader's, ...): a Ctrl-C
    that lands while one runs was printed as "Exception ignored in ..." and the command ran on to the end (a CLI test
    once saw exit status 0). Here a dropped ``KeyboardInterrupt`` is recorded instead of printed, and the next
    progress bar step (:func:`check_interrupt`), or the end of the block, raises it again."""
    global _DROPPED
    hook = sys.unraisablehook

    def unraisable(info):
        global _DROPPED
        if isinstance(info.exc_value, KeyboardInterrupt):
            _DROPPED = True
        else:
            hook(info)

    _DROPPED = False
    sys.unraisablehook = unraisable
    try:
        yield
        check_interrupt()  # dropped after the last progress step: the work is done, but the user asked to stop
    finally:
        sys.unraisablehook = hook
        _DROPPED = False


def check_interrupt() -> None:
    """Raise the ``KeyboardInterrupt`` that :func:`catch_interrupts` saw Python drop, once."""
    global _DROPPED
    if _DROPPED:
        _DROPPED = False
        raise KeyboardInterrupt


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.tqdm
    """``tqdm`` that honours :func:`set_enabled` and :func:`catch_interrupts` and prints plain lines when its stream
    is not a terminal."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self._plain = not _is_terminal(stream)
        kwargs["disable"] = bool(kwargs.get("disable", False)) or not _ENABLED
        if self._plain:
            kwargs.setdefault("mininterval", PLAIN_INTERVAL)
            kwargs["ascii"] = True
            kwargs["dynamic_ncols"] = False
            kwargs.setdefault("ncols", 100)
            kwargs["bar_format"] = (
                kwargs.get("bar_format") or "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
            )
        self._last_line = None
        super().__init__(*args, **kwargs)
        self._ready = True

    def __iter__(self):
        for item in super().__iter__():
            check_interrupt()
            yield item

    def update(self, n=1):
        check_interrupt()
        return super().update(n)

    def _plain_line(self) -> bool:
        line = self.__str__().strip()
        if not line or line == self._last_line:
            return False
        self._last_line = line
        self.fp.write(line + "\n")
        self.fp.flush()
        return True

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        if msg == "":  # tqdm clears a finished leave=False bar: nothing to erase in a log
            return False
        if msg is not None:
            self.fp.write(msg.strip() + "\n")
            return True
        return self._plain_line()

    def close(self):
        if not getattr(self, "_ready", False):  # a Ctrl-C inside __init__: tqdm's close would fail on what is unset
            return
        if self._plain and not self.disable:
            self._plain_line()  # the final count, once
            self.leave = False
        super().close()


def bar(
    iterable=None, *, desc: str, total: int | None = None, disable: bool = False, leave: bool = False, unit: str = "it"
):
    """A headlens progress bar (``disable`` for a caller's ``progress=False``)."""
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave, unit=unit)


def note(message: str) -> None:
    """Tell the user, on one stderr line (``note: ...``), something headlens decided for them: a cache file rebuilt,
    ``--workers`` capped. Shown whatever the progress switch says; written between bar updates, never into one."""
    _tqdm.write(f"note: {message}", file=sys.stderr)
