"""FrozenPairs: the read-only, hashable mapping under FaultRates and LimitTable, so the emulator's
config (a frozen dataclass) stays hashable and picklable."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class FrozenPairs(Mapping[str, Any]):
    """A mapping kept as a tuple of (key, value) pairs. Subclasses check and order the pairs in
    __init__ and store them in `_pairs`; pickling rebuilds through __init__, so checks run again."""

    __slots__ = ("_pairs",)
    _pairs: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        for name, value in self._pairs:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __hash__(self) -> int:
        return hash(self._pairs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, type(self)):
            return self._pairs == other._pairs
        return isinstance(other, Mapping) and dict(self._pairs) == dict(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._pairs)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._pairs,))
