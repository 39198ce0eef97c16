--- Ghost text for Neovim 0.10/0.11: request while typing, render with extmarks, accept all or part.
---
--- The first line of a suggestion is inline virtual text at the cursor; further lines
--- are virtual lines below. A new result equal to the one shown leaves the extmark
--- alone (no flicker). Typing the suggestion's next characters keeps the rest shown.
--- Results for a buffer state that has moved on are dropped.
local client = require("dlm.client")
local config = require("dlm.config")

local M = {}

M.ns = vim.api.nvim_create_namespace("dlm.ghost")

---@class dlm.Shown
---@field bufnr integer
---@field row integer 0-based
---@field col integer byte column of the cursor
---@field items string[] suggestion texts
---@field index integer which item is shown
---@field replaces integer[] bytes after the cursor that accepting each item replaces
---@field extmark integer|nil
---@field tick integer the buffer's changedtick when drawn (edits of our own are not the user's)

---@type dlm.Shown|nil
M.shown = nil
M.timer = nil ---@type uv.uv_timer_t|nil
M.pending = nil ---@type integer|nil request id in flight
M.enabled = true
M.dismissed_at = nil ---@type string|nil buffer state the user dismissed a suggestion at

--- Bytes of `s` that make up `units` code units of `encoding` (utf-8, utf-16 or utf-32), at most all of `s`.
local function units_to_bytes(s, units, encoding)
  if encoding == "utf-8" then
    return math.min(units, #s)
  end
  local bytes, used = 0, 0
  for ch in s:gmatch("[%z\1-\127\194-\244][\128-\191]*") do
    if used >= units then
      break
    end
    used = used + ((encoding == "utf-16" and #ch == 4) and 2 or 1)
    bytes = bytes + #ch
  end
  return bytes
end

local function state_key(bufnr)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  return ("%d:%d:%d:%d"):format(bufnr, vim.api.nvim_buf_get_changedtick(bufnr), row, col)
end

--- The suggestion shown now, or nil.
---@return string|nil
function M.current_text()
  local s = M.shown
  return s and s.items[s.index] or nil
end

local function clip(line)
  local limit = config.options.max_line_chars
  if #line > limit then
    return line:sub(1, limit) .. "…"
  end
  return line
end

--- Draw `M.shown` (replacing its old extmark).
local function draw()
  local s = assert(M.shown)
  local text = s.items[s.index]
  local lines = vim.split(text, "\n", { plain = true })
  local hl = config.options.hl_group
  local first = lines[1]
  if #lines == 1 and s.replaces[s.index] > 0 then
    -- the suggestion retypes what follows the cursor (closing brackets): show only the new part
    local after = vim.api.nvim_buf_get_text(s.bufnr, s.row, s.col, s.row, s.col + s.replaces[s.index], {})[1]
    if after ~= "" and first:sub(-#after) == after then
      first = first:sub(1, #first - #after)
    end
  end
  local virt_lines = {}
  for i = 2, math.min(#lines, config.options.max_lines) do
    virt_lines[#virt_lines + 1] = { { clip(lines[i]), hl } }
  end
  if #lines > config.options.max_lines then
    virt_lines[#virt_lines + 1] = { { ("… %d more lines"):format(#lines - config.options.max_lines), hl } }
  end
  local opts = {
    id = s.extmark,
    virt_text = { { clip(first), hl } },
    virt_text_pos = "inline",
    hl_mode = "combine",
    priority = 200,
  }
  if #virt_lines > 0 then
    opts.virt_lines = virt_lines
  end
  s.extmark = vim.api.nvim_buf_set_extmark(s.bufnr, M.ns, s.row, s.col, opts)
  s.tick = vim.api.nvim_buf_get_changedtick(s.bufnr)
end

--- Hide the suggestion.
function M.clear()
  if M.shown and vim.api.nvim_buf_is_valid(M.shown.bufnr) then
    vim.api.nvim_buf_clear_namespace(M.shown.bufnr, M.ns, 0, -1)
  end
  M.shown = nil
end

--- Show `items` at the cursor of `bufnr` (unchanged suggestions are left alone).
local function show(bufnr, items, replaces)
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  row = row - 1
  local s = M.shown
  if s and s.bufnr == bufnr and s.row == row and s.col == col and s.items[s.index] == items[1] then
    s.items, s.replaces, s.index = items, replaces, 1
    s.tick = vim.api.nvim_buf_get_changedtick(bufnr)
    return -- same text at the same place: keep the extmark, no flicker
  end
  M.clear()
  M.shown = { bufnr = bufnr, row = row, col = col, items = items, replaces = replaces, index = 1 }
  draw()
  client.notify("dlm/didShowCompletion", { uri = vim.uri_from_bufnr(bufnr) })
end

--- Ask the server for a suggestion at the cursor now.
---@param invoked boolean|nil true for an explicit request (no server-side debounce)
function M.request(invoked)
  local bufnr = vim.api.nvim_get_current_buf()
  if not M.enabled or not vim.b[bufnr].dlm_attached or vim.fn.mode():sub(1, 1) ~= "i" then
    return
  end
  local key = state_key(bufnr)
  if invoked then
    M.dismissed_at = nil -- asked for explicitly: a dismissal no longer holds
  elseif M.dismissed_at == key then
    return
  end
  if M.pending then
    client.cancel(M.pending)
    M.pending = nil
  end
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding())
  params.context = { triggerKind = invoked and 1 or 2 }
  local id
  id = client.request("textDocument/inlineCompletion", params, function(err, result)
    if M.pending == id then
      M.pending = nil
    end
    if err or not vim.api.nvim_buf_is_valid(bufnr) then
      return
    end
    if vim.api.nvim_get_current_buf() ~= bufnr or state_key(bufnr) ~= key or vim.fn.mode():sub(1, 1) ~= "i" then
      return -- the user moved on: drop it
    end
    local raw = result and (result.items or result) or {}
    local items, replaces = {}, {}
    local line = vim.api.nvim_buf_get_lines(bufnr, params.position.line, params.position.line + 1, false)[1] or ""
    local col = select(2, unpack(vim.api.nvim_win_get_cursor(0)))
    for _, item in ipairs(raw) do
      local text = type(item.insertText) == "table" and item.insertText.value or item.insertText
      if type(text) == "string" and text ~= "" then
        local replace = 0
        if item.range and item.range["end"].line == params.position.line then
          local units = item.range["end"].character - params.position.character
          replace = units_to_bytes(line:sub(col + 1), units, client.offset_encoding())
        end
        items[#items + 1] = text
        replaces[#replaces + 1] = replace
      end
    end
    if #items == 0 then
      M.clear()
    else
      show(bufnr, items, replaces)
    end
  end, bufnr)
  M.pending = id
end

--- Debounced request after a keystroke.
function M.schedule()
  if M.timer then
    M.timer:stop()
  else
    M.timer = vim.uv.new_timer()
  end
  M.timer:start(config.options.debounce_ms, 0, vim.schedule_wrap(function()
    M.request(false)
  end))
end

--- After text changed in insert mode: keep the rest shown if the user typed the suggestion's start.
function M.on_text_changed()
  local s = M.shown
  local bufnr = vim.api.nvim_get_current_buf()
  if s and s.bufnr == bufnr and s.tick == vim.api.nvim_buf_get_changedtick(bufnr) then
    return -- our own edit (a partial accept): the rest is already drawn
  end
  if s and s.bufnr == bufnr then
    local row, col = unpack(vim.api.nvim_win_get_cursor(0))
    local text = s.items[s.index]
    if row - 1 == s.row and col > s.col and not text:sub(1, col - s.col):find("\n", 1, true) then
      local typed = vim.api.nvim_buf_get_text(bufnr, s.row, s.col, s.row, col, {})[1]
      if text:sub(1, #typed) == typed and #typed < #text then
        s.items = { text:sub(#typed + 1) }
        s.replaces = { math.max(0, s.replaces[s.index] - #typed) }
        s.index, s.col = 1, col
        draw()
        M.schedule()
        return
      end
    end
    M.clear()
  end
  M.schedule()
end

--- After the cursor moved in insert mode without an edit: hide a suggestion that is not at the cursor.
function M.on_cursor_moved()
  local s = M.shown
  if not s then
    return
  end
  local bufnr = vim.api.nvim_get_current_buf()
  if s.bufnr == bufnr and s.tick ~= vim.api.nvim_buf_get_changedtick(bufnr) then
    return -- the text changed too: on_text_changed decides
  end
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  if s.bufnr ~= bufnr or s.row ~= row - 1 or s.col ~= col then
    M.clear()
  end
end

--- Insert `text` at the position of `s`, replacing `replace` bytes after it; move the cursor to its end.
---@param s dlm.Shown
local function insert(s, text, replace)
  local lines = vim.split(text, "\n", { plain = true })
  vim.api.nvim_buf_set_text(s.bufnr, s.row, s.col, s.row, s.col + replace, lines)
  local end_row = s.row + #lines - 1
  local end_col = (#lines == 1 and s.col or 0) + #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  return end_row, end_col
end

--- Accept the whole suggestion. Returns false when none is shown.
---@return boolean
function M.accept()
  local s = M.shown
  if not s then
    return false
  end
  local text, replace = s.items[s.index], s.replaces[s.index]
  M.clear()
  insert(s, text, replace)
  local position = vim.lsp.util.make_position_params(0, client.offset_encoding()).position
  client.notify("dlm/didAcceptCompletion", {
    acceptedLength = vim.fn.strchars(text),
    uri = vim.uri_from_bufnr(s.bufnr),
    position = position,
  })
  return true
end

--- The next word of `text`: leading blanks plus a run of word characters, or of one other character class.
local function next_word(text)
  return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text
end

--- The rest of the current line of `text`, with its line break.
local function next_line(text)
  local nl = text:find("\n", 1, true)
  if nl == 1 then
    return "\n" .. (text:sub(2):match("^[ \t]*") or "")
  end
  return nl and text:sub(1, nl - 1) or text
end

local function accept_part(pick)
  local s = M.shown
  if not s then
    return false
  end
  local text = s.items[s.index]
  local part = pick(text)
  if #part >= #text then
    return M.accept()
  end
  vim.api.nvim_buf_clear_namespace(s.bufnr, M.ns, 0, -1)
  local row, col = insert(s, part, 0)
  s.row, s.col, s.extmark = row, col, nil
  s.items, s.replaces, s.index = { text:sub(#part + 1) }, { s.replaces[s.index] }, 1
  draw()
  client.notify("dlm/didPartiallyAcceptCompletion", { acceptedLength = vim.fn.strchars(part) })
  return true
end

M._next_word = next_word -- for tests
M._units_to_bytes = units_to_bytes
M._show = show

--- Accept the next word of the suggestion.
function M.accept_word()
  return accept_part(next_word)
end

--- Accept the suggestion up to the end of its current line (or the line break, then the next indent).
function M.accept_line()
  return accept_part(next_line)
end

--- Show the next (`delta` = 1) or previous (-1) suggestion; with one item, ask the server again.
function M.cycle(delta)
  local s = M.shown
  if not s then
    M.request(true)
    return true
  end
  if #s.items > 1 then
    s.index = (s.index - 1 + delta) % #s.items + 1
    draw()
  end
  return true
end

--- Hide the suggestion and do not ask again until the text or cursor changes.
function M.dismiss()
  if not M.shown then
    return false
  end
  M.clear()
  M.dismissed_at = state_key(vim.api.nvim_get_current_buf())
  return true
end

--- Autocommands of an attached buffer.
---@param bufnr integer
function M.attach(bufnr)
  local group = vim.api.nvim_create_augroup("dlm.ghost." .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd("TextChangedI", { group = group, buffer = bufnr, callback = M.on_text_changed })
  vim.api.nvim_create_autocmd("CursorMovedI", { group = group, buffer = bufnr, callback = M.on_cursor_moved })
  vim.api.nvim_create_autocmd("InsertEnter", { group = group, buffer = bufnr, callback = M.schedule })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      if M.timer then
        M.timer:stop()
      end
      if M.pending then
        client.cancel(M.pending)
        M.pending = nil
      end
      M.clear()
    end,
  })
end

return M
