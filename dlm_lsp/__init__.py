"""dlm-lsp's language server (pygls 2 + lsprotocol).

Turns editor events into calls of the engine's public facade (``engine.Engine``)
and engine results into inline completions. It imports ``engine``; ``engine``
never imports it.
"""

__version__ = "0.1.0"
