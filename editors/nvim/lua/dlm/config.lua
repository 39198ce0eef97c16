--- Options of `require("dlm").setup(opts)`, with their defaults.
local M = {}

---@class dlm.Keymaps
---@field accept string|false Accept the whole suggestion (default "<M-l>").
---@field accept_word string|false Accept the next word (default "<M-Right>").
---@field accept_line string|false Accept up to the end of the suggestion's current line (default "<M-Down>").
---@field next string|false Show the next suggestion (default "<M-]>").
---@field prev string|false Show the previous suggestion (default "<M-[>").
---@field dismiss string|false Hide the suggestion (default "<C-]>").

---@class dlm.Config
---@field cmd string[] Command that starts the server (default `{ "dlm-lsp" }`; e.g. `{ "/path/venv/bin/dlm-lsp" }`).
---@field filetypes string[]|nil Filetypes to attach to; nil attaches to every buffer with a filetype.
---@field settings table The server's `dlm` settings, camelCase as in VS Code (`model`, `latencyBudgetMs`, ...).
---@field debounce_ms integer Wait this long after the last keystroke before asking (default 50).
---@field keymaps dlm.Keymaps Insert-mode keys; `false` leaves a key unmapped. None uses <Tab> unless you ask.
---@field native boolean|nil Use `vim.lsp.inline_completion` (Neovim 0.12+); nil = when available.
---@field max_lines integer Show at most this many lines of a suggestion (accepting inserts all of it).
---@field max_line_chars integer Show at most this many characters of each line.
---@field restart_limit integer Restarts after a crash before giving up (within a minute each).
---@field hl_group string Highlight of the ghost text (default "DlmSuggestion": like `Comment`, grey in any terminal).

---@type dlm.Config
M.defaults = {
  cmd = { "dlm-lsp" },
  filetypes = nil,
  settings = {},
  debounce_ms = 50,
  keymaps = {
    accept = "<M-l>",
    accept_word = "<M-Right>",
    accept_line = "<M-Down>",
    next = "<M-]>",
    prev = "<M-[>",
    dismiss = "<C-]>",
  },
  native = nil,
  max_lines = 60,
  max_line_chars = 400,
  restart_limit = 5,
  hl_group = "DlmSuggestion",
}

---@type dlm.Config
M.options = vim.deepcopy(M.defaults)

--- Files that mark a project's root (the server's workspace folder); `lsp/dlm.lua` uses them too.
M.root_markers = { ".git", "pyproject.toml", "package.json" }

--- Merge user options over the defaults and check their types.
---@param opts table|nil
---@return dlm.Config
function M.set(opts)
  local merged = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  vim.validate({
    cmd = { merged.cmd, "table" },
    filetypes = { merged.filetypes, "table", true },
    settings = { merged.settings, "table" },
    debounce_ms = { merged.debounce_ms, "number" },
    keymaps = { merged.keymaps, "table" },
    native = { merged.native, "boolean", true },
    max_lines = { merged.max_lines, "number" },
    max_line_chars = { merged.max_line_chars, "number" },
    restart_limit = { merged.restart_limit, "number" },
    hl_group = { merged.hl_group, "string" },
  })
  if #merged.cmd == 0 then
    error("dlm: `cmd` must name the server executable, e.g. { 'dlm-lsp' }")
  end
  M.options = merged
  return merged
end

--- The settings sent to the server: the client debounces, so the server does not wait again.
---@return table
function M.server_settings()
  local s = vim.deepcopy(M.options.settings)
  if s.debounceMs == nil then
    s.debounceMs = 0
  end
  return s
end

return M
