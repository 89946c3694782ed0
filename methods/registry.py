"""A small name -> constructor registry shared by models, distillers and datasets."""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

from kdflow.methods.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors; ``register`` is used as a decorator.

    ``get`` raises :class:`ConfigError` naming the field and the allowed names, so a typo in a
    config reads as a config error rather than a ``KeyError``.
    """

    def __init__(self, kind: str, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str, field: str | None = None) -> T:
        if name not in self._entries:
            raise ConfigError(
                field or self.field,
                f"unknown {self.kind} {name!r}",
                allowed=self.names(),
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
