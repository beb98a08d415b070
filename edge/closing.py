"""A context-manager mixin for the daemon's resources that end with ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with resource:`` calls ``close()`` on the way out; subclasses define ``close``."""

    def close(self) -> None:
        """Release the resource."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
