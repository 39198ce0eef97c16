"""Suppress suggestions that would insert nothing visible."""

from __future__ import annotations

from dlm_lsp.postprocess.base import Context, Suggestion


def suppress_empty(s: Suggestion, ctx: Context) -> Suggestion | None:
    """Drop a suggestion with nothing visible."""
    return None if not s.text.strip() else s
