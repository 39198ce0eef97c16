--- dlm.nvim: inline completions from the dlm-lsp language server (a masked diffusion model).
---
--- ```lua
--- require("dlm").setup({
---   cmd = { "dlm-lsp" },
---   settings = { latencyBudgetMs = 150 },                 -- the server's settings, as in VS Code
---   keymaps = { accept = "<Tab>" },                       -- <Tab> only if you ask for it
--- })
--- ```
---
--- On Neovim 0.12+ suggestions are shown by `vim.lsp.inline_completion`; on 0.10/0.11
--- this plugin renders them itself (`dlm.ghost`).
local client = require("dlm.client")
local config = require("dlm.config")
local ghost = require("dlm.ghost")

local M = {}

--- Whether the native inline completion of Neovim 0.12+ is used.
---@return boolean
function M.native()
  local available = vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.enable ~= nil
  if config.options.native == nil then
    return available
  end
  return config.options.native and available
end

local function want(bufnr)
  if vim.bo[bufnr].buftype ~= "" then
    return false
  end
  local ft = vim.bo[bufnr].filetype
  if ft == "" then
    return false
  end
  local fts = config.options.filetypes
  return fts == nil or vim.tbl_contains(fts, ft)
end

--- Attach the server to `bufnr` (if its filetype is wanted) and wire up the renderer.
---@param bufnr integer|nil
function M.attach(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  if not want(bufnr) or vim.b[bufnr].dlm_attached then
    return
  end
  local id = client.attach(bufnr)
  if not id then
    return
  end
  vim.b[bufnr].dlm_attached = true
  if M.native() then
    vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  else
    ghost.attach(bufnr)
  end
end

--- Run `native` on 0.12+, else `own`; in insert mode, an unused key is typed as itself.
local function action(key, own, native)
  return function()
    local done
    if M.native() then
      done = native and native() or false
    else
      done = own()
    end
    if not done and key then
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(key, true, false, true), "n", false)
    end
  end
end

local function native_select(count)
  return function()
    local ic = vim.lsp.inline_completion
    local f = ic.select or ic.jump
    if f then
      f({ count = count })
      return true
    end
    return false
  end
end

local function set_keymaps()
  local keys = config.options.keymaps
  local actions = {
    accept = { ghost.accept, function() return vim.lsp.inline_completion.get() ~= false end, "accept the suggestion" },
    accept_word = { ghost.accept_word, nil, "accept the next word of the suggestion" },
    accept_line = { ghost.accept_line, nil, "accept the suggestion's current line" },
    next = { function() return ghost.cycle(1) end, native_select(1), "next suggestion" },
    prev = { function() return ghost.cycle(-1) end, native_select(-1), "previous suggestion" },
    dismiss = { ghost.dismiss, nil, "dismiss the suggestion" },
  }
  for name, spec in pairs(actions) do
    local key = keys[name]
    if key then
      vim.keymap.set("i", key, action(key, spec[1], spec[2]), { desc = "dlm: " .. spec[3], silent = true })
    end
  end
end

--- Set the server's per-language switch (`settings.enable[filetype]`) and push it.
local function set_language(filetype, on)
  local enable = vim.deepcopy(config.options.settings.enable or {})
  enable[filetype] = on
  config.options.settings.enable = enable
  client.push_settings()
end

--- Turn suggestions on, globally or (with `filetype`) for one language (sent to the server).
---@param filetype string|nil
function M.enable(filetype)
  if filetype and filetype ~= "" then
    return set_language(filetype, true)
  end
  ghost.enabled = true
  client.restarts = {}
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) then
      vim.b[buf].dlm_attached = nil
      M.attach(buf)
    end
  end
end

--- Turn suggestions off, globally (the server is stopped) or for one language.
---@param filetype string|nil
function M.disable(filetype)
  if filetype and filetype ~= "" then
    return set_language(filetype, false)
  end
  ghost.enabled = false
  ghost.clear()
  client.stop()
end

--- Change server settings live, e.g. `require("dlm").set_settings({ latencyBudgetMs = 100 })`.
---@param settings table
function M.set_settings(settings)
  config.options.settings = vim.tbl_deep_extend("force", config.options.settings, settings)
  client.push_settings()
end

--- The server's `dlm/status` (nil when it is not running), waiting at most `timeout_ms`.
---@param timeout_ms integer|nil
---@return table|nil
function M.status(timeout_ms)
  local c = client.get()
  if not c then
    return nil
  end
  local response = client.call(c, "request_sync", "dlm/status", {}, timeout_ms or 2000)
  return response and response.result or nil
end

local function show_status()
  local s = M.status()
  if not s then
    vim.notify("dlm: the server is not running" .. (client.last_error and (" (" .. client.last_error .. ")") or ""))
    return
  end
  local lines = {
    ("dlm-lsp %s: model %s"):format(s.version or "?", s.state or "?"),
    ("  model: %s (%s, %s)"):format(s.model or "?", s.family or "?", s.precision or "?"),
    ("  backend: %s on %s"):format(s.backend or "?", s.device or "?"),
  }
  if s.error and s.error ~= vim.NIL then
    lines[#lines + 1] = "  error: " .. s.error
  end
  if s.pulling and s.pulling ~= vim.NIL then
    lines[#lines + 1] = "  downloading: " .. s.pulling
  elseif s.missing and s.missing ~= vim.NIL then
    lines[#lines + 1] = ("  %s is not downloaded: the demo model runs (dlm-lsp models pull %s)"):format(s.missing, s.missing)
  end
  if s.requests then
    lines[#lines + 1] = ("  requests %d, completions %d, shown %d, accepted %d"):format(
      s.requests or 0, s.completions or 0, s.shown or 0, s.accepted or 0
    )
    if (s.gated or 0) > 0 then
      lines[#lines + 1] = ("  %d hidden by the confidence gate (settings.minConfidence)"):format(s.gated)
    end
  end
  lines[#lines + 1] = "  renderer: " .. (M.native() and "vim.lsp.inline_completion (native)" or "dlm extmarks")
  vim.notify(table.concat(lines, "\n"))
end

--- Define `DlmSuggestion` (unless the user or the colour scheme already did): `Comment`'s look
--- with a grey terminal colour, because many schemes (Neovim 0.11's default among them) give
--- `Comment` only a GUI colour, and ghost text must never look like typed text.
function M.define_highlights()
  local comment = vim.api.nvim_get_hl(0, { name = "Comment", link = false })
  vim.api.nvim_set_hl(0, "DlmSuggestion", {
    default = true,
    fg = comment.fg or 0x808080,
    ctermfg = comment.ctermfg or 244,
    italic = comment.italic,
  })
end

--- Load the model of the current settings again (after fixing its folder, say), without restarting
--- anything: the server's `dlm.reloadModel` command.
function M.reload()
  local id = client.request("workspace/executeCommand", { command = "dlm.reloadModel" }, function(err)
    if err then
      vim.notify("dlm: reload failed: " .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
    end
  end)
  if not id then
    vim.notify("dlm: the server is not running", vim.log.levels.WARN)
  end
end

--- Set the plugin up. See `dlm.Config` (lua/dlm/config.lua) for the options and defaults.
---@param opts dlm.Config|table|nil
function M.setup(opts)
  config.set(opts)
  set_keymaps()
  local group = vim.api.nvim_create_augroup("dlm", { clear = true })
  M.define_highlights()
  vim.api.nvim_create_autocmd("ColorScheme", { group = group, callback = M.define_highlights })
  vim.api.nvim_create_autocmd("FileType", {
    group = group,
    callback = function(ev)
      if ghost.enabled then
        M.attach(ev.buf)
      end
    end,
  })
  vim.api.nvim_create_user_command("DlmEnable", function(a) M.enable(a.args) end, {
    nargs = "?", complete = "filetype", desc = "dlm: enable suggestions (optionally for one filetype)",
  })
  vim.api.nvim_create_user_command("DlmDisable", function(a) M.disable(a.args) end, {
    nargs = "?", complete = "filetype", desc = "dlm: disable suggestions (optionally for one filetype)",
  })
  vim.api.nvim_create_user_command("DlmStatus", show_status, { desc = "dlm: server, model and counters" })
  vim.api.nvim_create_user_command("DlmReload", M.reload, { desc = "dlm: load the model again (after fixing it)" })
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do -- buffers opened before setup()
    if vim.api.nvim_buf_is_loaded(buf) then
      M.attach(buf)
    end
  end
end

return M
