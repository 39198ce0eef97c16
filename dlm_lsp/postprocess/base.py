"""What every post-processing filter sees and returns.

A filter is a small pure function ``(Suggestion, Context) -> Suggestion | None``:
``None`` drops the suggestion. Filters never look at the model; they only know the
text around the cursor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    """The text around the cursor, split the way filters need it."""

    line_prefix: str
    """The current line up to the cursor."""
    line_suffix: str
    """The current line after the cursor (no newline)."""
    next_lines: tuple[str, ...] = ()
    """The lines after the current one (a few are enough)."""
    previous_lines: tuple[str, ...] = ()
    """The lines before the current one, nearest last."""
    multiline: bool = False
    """Whether a multi-line suggestion is wanted here."""
    language: str = "python"
    text_before: str = ""
    """A window of the document before the cursor (for parsing)."""
    text_after: str = ""
    """A window of the document after the cursor (for parsing)."""


@dataclass(frozen=True)
class Suggestion:
    """Text to insert at the cursor, replacing ``replace_suffix`` characters of ``line_suffix``."""

    text: str
    replace_suffix: int = 0

    def changed(self, text: str, replace_suffix: int | None = None) -> "Suggestion":
        """A copy with new text (and, if given, a new replace range)."""
        return Suggestion(text, self.replace_suffix if replace_suffix is None else replace_suffix)
