"""``with obj:`` for genimg's clients and stores: one mixin, so each class writes only its ``close()``."""

from __future__ import annotations

from typing import Self


class Closing:
    """Mixin: a context manager that returns the object itself and calls its ``close()`` on exit."""

    def close(self) -> None:
        """Release what the object holds (connections, pools); subclasses say what."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
