"""The one error type for bad user input, shared by every layer."""
from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
    """Bad input, reported as one paragraph naming the field, the problem and the fix.

    ``field`` is the dotted config path the user wrote (``study.methods.kd.temperature``);
    ``allowed`` lists accepted values when the set is finite; ``fix`` says what to change.
    """

    def __init__(self, field: str, problem: str, allowed: Iterable[object] | None = None,
                 fix: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.allowed = list(allowed) if allowed is not None else None
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"Invalid setting `{self.field}`: {self.problem}."
        if self.allowed is not None:
            text += " Allowed values: " + ", ".join(str(a) for a in self.allowed) + "."
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` put in front of the field path."""
        return ConfigError(f"{prefix}.{self.field}", self.problem, self.allowed, self.fix)
