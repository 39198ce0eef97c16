"""Post-processing of engine output into what the editor shows: one pure filter per module.

:func:`postprocess` runs them in order; any filter may drop the suggestion.
Golden cases live in ``tests/golden/postprocess/``.
"""

from __future__ import annotations

from typing import Callable

from dlm_lsp.postprocess.base import Context, Suggestion
from dlm_lsp.postprocess.brackets import keep_brackets_balanced
from dlm_lsp.postprocess.closing import absorb_auto_closed
from dlm_lsp.postprocess.duplicates import drop_suffix_duplicates
from dlm_lsp.postprocess.empty import suppress_empty
from dlm_lsp.postprocess.repetition import cut_repetition
from dlm_lsp.postprocess.scope import trim_to_scope
from dlm_lsp.postprocess.syntax_trim import trim_to_syntax

Filter = Callable[[Suggestion, Context], "Suggestion | None"]

FILTERS: tuple[tuple[str, Filter], ...] = (
    ("scope", trim_to_scope),
    ("syntax", trim_to_syntax),
    ("repetition", cut_repetition),
    ("closing", absorb_auto_closed),
    ("duplicates", drop_suffix_duplicates),
    ("brackets", keep_brackets_balanced),
    ("empty", suppress_empty),
)


def postprocess(text: str, ctx: Context) -> Suggestion | None:
    """Run every filter over ``text``; None when a filter drops it."""
    suggestion = Suggestion(text)
    for _name, run in FILTERS:
        kept = run(suggestion, ctx)
        if kept is None:
            return None
        suggestion = kept
    return suggestion


__all__ = ["Context", "FILTERS", "Suggestion", "postprocess"]
