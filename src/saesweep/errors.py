"""The errors saesweep raises on purpose, on the lowest floor: every part imports them from here
(nothing here imports the rest of the package)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config or flag. The message names the field and what is allowed."""


class CorruptFile(ValueError):
    """A file whose content does not match its checksum (damaged on disk or in transit)."""
