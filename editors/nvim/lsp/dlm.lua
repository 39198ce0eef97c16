-- nvim-lspconfig style config for Neovim 0.11+ (`vim.lsp.enable("dlm")` with this folder on
-- 'runtimepath'). The plugin's require("dlm").setup() does the same and adds ghost text,
-- keymaps and commands; use this file alone only with Neovim 0.12's native inline completion.
return {
  cmd = { "dlm-lsp" },
  root_markers = require("dlm.config").root_markers,
  init_options = { dlm = {} },
  settings = { dlm = {} },
}
