#!/usr/bin/env bash
# Install what the real-editor tests of the VS Code extension need, offline-friendly:
# Debian's Chromium (+ libkrb5-dev and ripgrep for code-server), code-server (VS Code in
# the browser) and playwright-core, into $DLM_E2E_DIR (default: <repo>/.e2e), then build
# and package the extension (.vsix). Idempotent: what is already there is kept.
# Steps as found to work on Debian 12 + Node 20 (see shared/TOOLING.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
E2E="${DLM_E2E_DIR:-$ROOT/.e2e}"
CODE_SERVER_VERSION="4.100.3"
PLAYWRIGHT_VERSION="1.65.1"
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

say() { echo "[install-e2e] $*" >&2; }

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v rg >/dev/null || missing+=(ripgrep)
dpkg -s libkrb5-dev >/dev/null 2>&1 || missing+=(libkrb5-dev)
if ((${#missing[@]})); then
  say "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$E2E"
CS="$E2E/node_modules/code-server"
if [ ! -x "$CS/out/node/entry.js" ] || [ ! -f "$E2E/.code-server-$CODE_SERVER_VERSION" ]; then
  say "installing code-server $CODE_SERVER_VERSION (a few minutes)"
  cd "$E2E"
  [ -f package.json ] || echo '{"name": "dlm-e2e", "private": true}' > package.json
  npm install --no-save --ignore-scripts "code-server@$CODE_SERVER_VERSION" "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
  npm rebuild argon2 >/dev/null
  cd "$CS/lib/vscode"
  npm install --omit=dev --ignore-scripts >/dev/null
  mkdir -p node_modules/@vscode/ripgrep/bin
  ln -sf "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
  npm_config_yes=true npm rebuild >/dev/null
  cd "$CS"
  npm_config_unsafe_perm=true npm_config_yes=true npm run postinstall >/dev/null
  touch "$E2E/.code-server-$CODE_SERVER_VERSION"
fi

say "building and packaging the extension"
cd "$ROOT/editors/vscode"
if [ -f package-lock.json ]; then npm ci >/dev/null; else npm install >/dev/null; fi
npm run --silent typecheck
npm run --silent package >/dev/null
say "ready: $ROOT/editors/vscode/dlm.vsix, code-server in $CS"
