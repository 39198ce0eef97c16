--- `:checkhealth dlm`: server executable, model, backend, and which renderer this Neovim uses.
local M = {}

function M.check()
  local health = vim.health
  local config = require("dlm.config")
  local client = require("dlm.client")
  local dlm = require("dlm")

  health.start("dlm: Neovim")
  local v = vim.version()
  health.info(("Neovim %d.%d.%d"):format(v.major, v.minor, v.patch))
  if dlm.native() then
    health.ok("suggestions are rendered by vim.lsp.inline_completion (Neovim 0.12+)")
  elseif vim.fn.has("nvim-0.10") == 1 then
    health.ok("suggestions are rendered by dlm's extmarks (Neovim 0.10/0.11 path)")
  else
    health.error("Neovim 0.10 or newer is needed (inline virtual text)")
  end

  health.start("dlm: server")
  local ok, message = client.executable()
  if not ok then
    health.error(message)
    return
  end
  local exe = vim.fn.exepath(config.options.cmd[1])
  health.ok("server executable: " .. exe)
  local version = vim.fn.system({ config.options.cmd[1], "--version" })
  if vim.v.shell_error == 0 then
    health.info(vim.trim(version))
  else
    health.warn("`" .. config.options.cmd[1] .. " --version` failed: " .. vim.trim(version))
  end

  health.start("dlm: model")
  local model = config.options.settings.model
  if model and model ~= "" and vim.fn.isdirectory(vim.fn.expand(model)) == 0 then
    health.error("settings.model points to a folder that does not exist: " .. model)
  end
  local status = dlm.status()
  if not status then
    health.warn("the server is not running (open a file, or :DlmEnable)"
      .. (client.last_error and ("; last error: " .. client.last_error) or ""))
    return
  end
  if status.state == "ready" then
    health.ok(("model ready: %s (%s, %s)"):format(status.model, status.family, status.precision))
    health.ok(("backend: %s on %s"):format(status.backend, status.device))
  elseif status.state == "error" then
    health.error("model failed to load: " .. tostring(status.error))
  else
    health.info("model " .. tostring(status.state) .. ": " .. tostring(status.model))
  end
end

return M
