"""``python -m dlm_lsp``: the language server (see ``dlm_lsp.cli``)."""

from dlm_lsp.cli import main

raise SystemExit(main())
