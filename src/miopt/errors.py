"""Errors users see: each names where the problem is (file, line or record, field)."""

from __future__ import annotations


class MioptError(Exception):
    """Base class: the CLI prints these as one line and exits with ``exit_status``."""

    exit_status: int = 2


class DataError(MioptError):
    """A bad record or file. ``str(error)`` reads ``FILE:LINE: field 'F': what is wrong``."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        parts = []
        if source:
            parts.append(f"{source}:")
        if field:
            parts.append(f"field {field!r}:")
        parts.append(message)
        super().__init__(" ".join(parts))


class OptionError(MioptError):
    """A bad option value (unknown objective, missing model path, ...)."""


class WriteError(MioptError):
    """A file could not be written (full disk, quota, read-only or forbidden folder): the message names
    the file, the space needed when known, and what was kept. Exit status 1: the input was fine."""

    exit_status = 1


def require(accepted: bool, flag: str, rule: str, value: object) -> None:
    """Raise ``OptionError("FLAG must be RULE, got VALUE")`` unless ``accepted``."""
    if not accepted:
        raise OptionError(f"{flag} must be {rule}, got {value!r}")
