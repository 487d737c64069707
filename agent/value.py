"""Value classes without :mod:`dataclasses` (the agent's start-up time).

``dataclasses`` cost the agent about 20 ms at every start: its import (it imports
``inspect``, and with it ``ast``, ``dis`` and ``tokenize``) and the code it compiles for each
decorated class.  A subclass of :class:`Value` lists its fields in ``__slots__`` and
writes its own ``__init__``; equality, ``repr`` and :meth:`Value.replace` come from here,
by those fields.  :class:`Value` objects hash by their fields and are not to be changed
once made (nothing enforces it: the check would slow every ``__init__``);
:class:`Mutable` ones do not hash, and may change.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    from typing import Any, ClassVar, Self


class Value:
    """Fields in ``__slots__`` (each class's ``__init__`` gives their order); equal, hashed and
    shown by them."""

    __slots__ = ()
    _hidden: ClassVar[tuple[str, ...]] = ()  # fields left out of repr (a secret's content)

    def _names(self) -> tuple[str, ...]:
        return self.__slots__  # (always a tuple of names here)

    def _values(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self._names()])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = (f"{name}={getattr(self, name)!r}" for name in self._names() if name not in self._hidden)
        return f"{type(self).__name__}({', '.join(shown)})"

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field names) made."""
        names = self._names()
        unknown = changes.keys() - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        return type(self)(**{name: getattr(self, name) for name in names} | changes)


class Mutable(Value):
    """A :class:`Value` whose fields may change: not hashable."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]
