"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a refused request: the message says what is wrong and what to do."""


class Problems:
    """Input problems gathered so that one error names them all (the caller orders them: the folder first)::

        problems = Problems()
        with problems.check():
            config = read_config(folder)       # a UserError here is noted, and the block ends
        if keep is None:
            problems.add("give --keep")
        problems.raise_any()
    """

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, message: str) -> None:
        self.found.append(message)

    def check(self) -> _Noted:
        """A block whose :class:`UserError` is noted instead of raised."""
        return _Noted(self)

    def raise_any(self) -> None:
        """One :class:`UserError` naming every problem noted, if any."""
        if len(self.found) == 1:
            raise UserError(self.found[0])
        if self.found:
            raise UserError(f"{len(self.found)} problems: " + "; ".join(self.found))


class _Noted:
    def __init__(self, problems: Problems) -> None:
        self.problems = problems

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if isinstance(error, UserError):
            self.problems.add(str(error))
            return True
        return False
