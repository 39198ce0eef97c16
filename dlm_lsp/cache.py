"""Type-through cache: serve the rest of a shown suggestion instantly while the user types it.

Entries are keyed by a hash of the context (the end of the prefix and the start
of the suffix). A lookup walks back through the prefix: if the user typed ``k``
characters since a suggestion was computed and they match that suggestion's
start, its remaining text is served without asking the model. Bounded LRU.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

PREFIX_KEY_CHARS = 400
SUFFIX_KEY_CHARS = 200


@dataclass(frozen=True)
class CachedSuggestion:
    """What was suggested at a context: the text and how much of the line after it replaced."""

    text: str
    replace_suffix: int = 0


def context_key(prefix: str, suffix: str) -> str:
    """Hash of the text around the cursor that decides a suggestion."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(prefix[-PREFIX_KEY_CHARS:].encode("utf-8", "surrogatepass"))
    digest.update(b"\x00")
    digest.update(suffix[:SUFFIX_KEY_CHARS].encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


class CompletionCache:
    """LRU of suggestions by context key, with type-through lookups."""

    def __init__(self, capacity: int = 256, max_walk: int = 64) -> None:
        self.capacity = capacity
        self.max_walk = max_walk
        self._entries: OrderedDict[str, CachedSuggestion] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, prefix: str, suffix: str, suggestion: CachedSuggestion) -> None:
        """Remember ``suggestion`` for this context."""
        key = context_key(prefix, suffix)
        with self._lock:
            self._entries[key] = suggestion
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, prefix: str, suffix: str) -> CachedSuggestion | None:
        """The suggestion for this context, exact or typed-through; None on a miss."""
        with self._lock:
            for typed in range(0, min(self.max_walk, len(prefix)) + 1):
                key = context_key(prefix[: len(prefix) - typed], suffix)
                entry = self._entries.get(key)
                if entry is None:
                    continue
                typed_text = prefix[len(prefix) - typed :]
                if entry.text.startswith(typed_text) and len(entry.text) > typed:
                    self._entries.move_to_end(key)
                    return CachedSuggestion(entry.text[typed:], entry.replace_suffix)
            return None

    def __len__(self) -> int:
        return len(self._entries)
