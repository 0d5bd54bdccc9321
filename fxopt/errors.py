"""The errors fxopt raises. Each says what went wrong and what to try next."""

from __future__ import annotations


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """The model could not be captured into fxopt's graph IR.

    ``reason`` is what went wrong (the message without location and hint); ``detail`` is
    what torch logged and printed while capture ran (empty when it said nothing).
    """

    def __init__(
        self,
        message: str,
        *,
        module_path: str | None = None,
        source: str | None = None,
        hint: str | None = None,
        detail: str = "",
    ) -> None:
        self.reason = message
        self.module_path = module_path
        self.source = source
        self.hint = hint
        self.detail = detail
        parts = [message]
        if module_path is not None or source is not None:
            where = f"in module '{module_path or '<root>'}'"
            if source:
                where += f" at {source}"
            parts.append(where)
        if hint:
            parts.append(f"try: {hint}")
        super().__init__("; ".join(parts))


class InputError(FxoptError, ValueError):
    """Inputs (example inputs, calibration batches, call arguments) do not fit the model."""


class UnknownPassError(FxoptError, KeyError):
    """No pass is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PassOptionError(FxoptError, TypeError):
    """A pass was given an option it does not have, or a value it cannot take."""


class UnknownOptionError(PassOptionError):
    """The pass has no option of that name."""


class OptionTypeError(PassOptionError):
    """The option's value is not of the type the pass declares for it."""


class OptionValueError(PassOptionError, ValueError):
    """The option's value has the right type but is out of the range the pass accepts."""


class PassFailedError(FxoptError):
    """A pass raised, broke its contract, or failed verification under ``strict=True``."""

    def __init__(self, pass_name: str, reason: str, previous: list[str]) -> None:
        self.pass_name = pass_name
        self.reason = reason
        self.previous = list(previous)
        before = ", ".join(previous) if previous else "none"
        super().__init__(f"pass '{pass_name}' failed: {reason} (passes run before it: {before})")


class BackendError(FxoptError):
    """A backend could not lower or run the optimized graph."""
