--- Starting the dlm-lsp client, restarting it after a crash, and talking to it.
local config = require("dlm.config")

local M = {}

M.name = "dlm"
---@type integer|nil
M.client_id = nil
M.stopping = false
M.restarts = {} ---@type number[] times (seconds) of recent restarts
M.last_error = nil ---@type string|nil

local has_011 = vim.fn.has("nvim-0.11") == 1

--- Show a message once Neovim is idle: a message from the server or a callback must not
--- interrupt (and be reported as an error of) whatever command is running right now.
local function show_message(message, level)
  vim.schedule(function()
    vim.notify(message, level)
  end)
end

--- Call a client method in the 0.11+ form (`client:m(...)`) or the 0.10 form (`client.m(...)`).
---@param client vim.lsp.Client
---@param method string
function M.call(client, method, ...)
  if has_011 then
    return client[method](client, ...)
  end
  return client[method](...)
end

---@return vim.lsp.Client|nil
function M.get()
  if M.client_id == nil then
    return nil
  end
  local client = vim.lsp.get_client_by_id(M.client_id)
  if client == nil or (client.is_stopped and M.call(client, "is_stopped")) then
    return nil
  end
  return client
end

--- Send a request; returns the request id (or nil).
function M.request(method, params, handler, bufnr)
  local client = M.get()
  if not client then
    return nil
  end
  local ok, id = M.call(client, "request", method, params, handler, bufnr)
  return ok and id or nil
end

function M.cancel(id)
  local client = M.get()
  if client and id then
    M.call(client, "cancel_request", id)
  end
end

function M.notify(method, params)
  local client = M.get()
  if client then
    M.call(client, "notify", method, params)
  end
end

---@return string
function M.offset_encoding()
  local client = M.get()
  return client and client.offset_encoding or "utf-16"
end

--- Whether the server executable can be found; the message says what to do if not.
---@return boolean, string|nil
function M.executable()
  local exe = config.options.cmd[1]
  if vim.fn.executable(exe) == 1 then
    return true, nil
  end
  return false,
    ("dlm: the server `%s` was not found. Install it from a clone of dlm-lsp (`python3 -m venv .venv && "
      .. ".venv/bin/pip install -e .`; it is not on PyPI, where `dlm-lsp` is an unrelated project) and point `cmd` at it, "
      .. "e.g. require('dlm').setup({ cmd = { '/path/to/dlm-lsp/.venv/bin/dlm-lsp' } })"):format(exe)
end

--- The vim.lsp client config (also what `lsp/dlm.lua` describes).
---@return vim.lsp.ClientConfig
function M.client_config()
  local settings = config.server_settings()
  return {
    name = M.name,
    cmd = config.options.cmd,
    root_dir = vim.fs.root(0, config.root_markers) or vim.uv.cwd(),
    init_options = { dlm = settings },
    settings = { dlm = settings },
    on_exit = function(code, signal)
      vim.schedule(function()
        M.on_exit(code, signal)
      end)
    end,
    handlers = {
      ["window/showMessage"] = function(_, result)
        if result and result.type == vim.lsp.protocol.MessageType.Error then
          M.last_error = result.message
        end
        show_message(result.message, result.type == vim.lsp.protocol.MessageType.Error and vim.log.levels.ERROR or vim.log.levels.WARN)
      end,
    },
  }
end

--- Start the client (once) and attach it to `bufnr`.
---@param bufnr integer
---@return integer|nil client id
function M.attach(bufnr)
  local ok, message = M.executable()
  if not ok then
    if not M.warned then
      M.warned = true
      M.last_error = message
      show_message(message, vim.log.levels.ERROR) -- not inside the FileType autocommand that got us here
    end
    return nil
  end
  local client = M.get()
  if client then
    vim.lsp.buf_attach_client(bufnr, client.id)
    return client.id
  end
  M.stopping = false
  M.client_id = vim.lsp.start(M.client_config(), { bufnr = bufnr, reuse_client = function() return false end })
  return M.client_id
end

--- After an unexpected exit: restart with backoff (1, 2, 4 ... s), at most `restart_limit` times a minute.
function M.on_exit(code, signal)
  local buffers = {}
  M.client_id = nil
  if M.stopping then
    return
  end
  local now = vim.uv.now() / 1000
  M.restarts = vim.tbl_filter(function(t)
    return now - t < 60
  end, M.restarts)
  if #M.restarts >= config.options.restart_limit then
    M.last_error = ("dlm-lsp exited (code %s, signal %s) %d times within a minute; not restarting. "
      .. "Run :DlmEnable to try again, see :checkhealth dlm and :LspLog"):format(code, signal, #M.restarts)
    show_message(M.last_error, vim.log.levels.ERROR)
    return
  end
  M.restarts[#M.restarts + 1] = now
  local delay = 1000 * 2 ^ (#M.restarts - 1)
  M.last_error = ("dlm-lsp exited (code %s, signal %s); restarting in %d s"):format(code, signal, delay / 1000)
  show_message(M.last_error, vim.log.levels.WARN)
  for _, buf in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(buf) and vim.b[buf].dlm_attached then
      buffers[#buffers + 1] = buf
    end
  end
  vim.defer_fn(function()
    if M.client_id ~= nil or M.stopping then
      return -- started again meanwhile (e.g. :DlmEnable), or stopped on purpose
    end
    for _, buf in ipairs(buffers) do
      if vim.api.nvim_buf_is_valid(buf) then
        M.attach(buf)
      end
    end
  end, delay)
end

--- Stop the client on purpose (no restart).
function M.stop()
  M.stopping = true
  local client = M.get()
  if client then
    M.call(client, "stop")
  end
  M.client_id = nil
end

--- Push changed settings: `workspace/didChangeConfiguration` (the server then pulls them).
function M.push_settings()
  local client = M.get()
  if not client then
    return
  end
  local settings = config.server_settings()
  client.settings = { dlm = settings }
  M.notify("workspace/didChangeConfiguration", { settings = { dlm = settings } })
end

return M
