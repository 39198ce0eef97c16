// dlm for VS Code: launches the dlm-lsp language server and shows its inline completions.
//
// The extension stays thin: it starts the server, passes the `dlm.*` settings through
// (initializationOptions, workspace/configuration, didChangeConfiguration), shows a
// status bar item, and reports shown/accepted suggestions to the server's local
// counters. Completion itself is vscode-languageclient's inline completion feature.
import * as fs from "fs";
import * as path from "path";
import * as vscode from "vscode";
import {
  CloseAction,
  CloseHandlerResult,
  ErrorAction,
  ErrorHandler,
  ErrorHandlerResult,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  State,
} from "vscode-languageclient/node";

const SECTION = "dlm";
const MAX_RESTARTS = 5;
const RESTART_WINDOW_MS = 3 * 60 * 1000;
const STATUS_POLL_MS = 2000;

type ServerStatus = {
  state?: string;
  error?: string | null;
  model?: string | null;
  backend?: string | null;
  device?: string | null;
  last_latency_ms?: number | null;
  median_latency_ms?: number | null;
  requests?: number;
  completions?: number;
  gated?: number;
  shown?: number;
  accepted?: number;
  partially_accepted?: number;
};

/** What was last shown in a document, to recognise partial accepts (word/line) from the edits they make. */
type Shown = { uri: string; offset: number; text: string };

let client: LanguageClient | undefined;
let log: vscode.LogOutputChannel;
let statusItem: vscode.StatusBarItem;
let pollTimer: NodeJS.Timeout | undefined;
let restartTimer: NodeJS.Timeout | undefined;
let restarts: number[] = [];
let lastShown: Shown | undefined;
let stopping = false;

/** The server's settings: the `dlm` section without the client-only `dlm.server.*` keys. */
function serverSettings(): Record<string, unknown> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(config)) {
    const value = config.get(key);
    if (key !== "server" && typeof value !== "function") {
      out[key] = value;
    }
  }
  return out;
}

/** Resolve the server executable on PATH (or as given); undefined when it cannot be found. */
function findExecutable(command: string): string | undefined {
  const isFile = (p: string) => {
    try {
      return fs.statSync(p).isFile();
    } catch {
      return false;
    }
  };
  if (command.includes("/") || command.includes("\\")) {
    const full = command.startsWith("~") ? path.join(process.env.HOME ?? "", command.slice(1)) : command;
    return isFile(full) ? full : undefined;
  }
  const exts = process.platform === "win32" ? (process.env.PATHEXT ?? ".EXE").split(";") : [""];
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    for (const ext of exts) {
      const candidate = path.join(dir, command + ext);
      if (isFile(candidate)) {
        return candidate;
      }
    }
  }
  return undefined;
}

function setStatus(kind: "loading" | "ready" | "error" | "disabled" | "stopped", detail = ""): void {
  const icons = { loading: "$(sync~spin)", ready: "$(check)", error: "$(error)", disabled: "$(circle-slash)", stopped: "$(debug-stop)" };
  statusItem.text = `${icons[kind]} dlm${detail && kind === "ready" ? ` ${detail}` : ""}`;
  statusItem.tooltip = {
    loading: `dlm: loading the model… ${detail}`,
    ready: `dlm: ready${detail ? ` (last completion ${detail})` : ""}. Click for status.`,
    error: `dlm: ${detail}. Click to show the log.`,
    disabled: "dlm: completions are disabled. Click to enable.",
    stopped: `dlm: the server is not running. ${detail}`,
  }[kind];
  statusItem.command = { error: "dlm.showLog", disabled: "dlm.enable", stopped: "dlm.restartServer", loading: "dlm.showStatus", ready: "dlm.showStatus" }[kind];
  statusItem.backgroundColor = kind === "error" ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
  statusItem.show();
}

/** The `dlm.enable` switch for a language id (the `*` fallback when none is given or set). */
function enabledFor(languageId = "*"): boolean {
  const enable = vscode.workspace.getConfiguration(SECTION).get<Record<string, boolean>>("enable") ?? {};
  return (enable[languageId] ?? enable["*"] ?? true) !== false;
}

async function pollStatus(): Promise<void> {
  if (!client || client.state !== State.Running) {
    return;
  }
  try {
    const s = await client.sendRequest<ServerStatus>("dlm/status", {});
    if (!enabledFor()) {
      setStatus("disabled");
    } else if (s.state === "ready") {
      setStatus("ready", s.last_latency_ms != null ? `${Math.round(s.last_latency_ms)} ms` : "");
    } else if (s.state === "error") {
      setStatus("error", `model failed to load: ${s.error ?? "unknown error"}`);
    } else {
      setStatus("loading", s.model ?? "");
    }
  } catch (err) {
    log.debug(`dlm/status failed: ${err}`);
  }
}

/** Restart with backoff (1, 2, 4, 8, 16 s); after MAX_RESTARTS within RESTART_WINDOW_MS, stop and say so. */
class BackoffErrorHandler implements ErrorHandler {
  error(): ErrorHandlerResult {
    return { action: ErrorAction.Continue, handled: true };
  }

  closed(): CloseHandlerResult {
    if (stopping) {
      return { action: CloseAction.DoNotRestart, handled: true };
    }
    const now = Date.now();
    restarts = restarts.filter((t) => now - t < RESTART_WINDOW_MS);
    if (restarts.length >= MAX_RESTARTS) {
      const message = `dlm-lsp stopped ${restarts.length} times in 3 minutes; not restarting. Check the log, then run "dlm: Restart the server".`;
      setStatus("error", "the server keeps crashing");
      void vscode.window.showErrorMessage(message, "Show Log").then((choice) => choice && log.show());
      return { action: CloseAction.DoNotRestart, message, handled: true };
    }
    restarts.push(now);
    const delay = 1000 * 2 ** (restarts.length - 1);
    log.warn(`dlm-lsp exited; restarting in ${delay / 1000} s (${restarts.length}/${MAX_RESTARTS})`);
    setStatus("error", `the server exited; restarting in ${delay / 1000} s`);
    restartTimer = setTimeout(() => {
      void startClient();
    }, delay);
    return { action: CloseAction.DoNotRestart, handled: true };
  }
}

function clientOptions(): LanguageClientOptions {
  return {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    initializationOptions: { [SECTION]: serverSettings() },
    synchronize: { configurationSection: SECTION },
    outputChannel: log,
    errorHandler: new BackoffErrorHandler(),
    middleware: {
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!enabledFor(document.languageId)) {
          return []; // switched off for this language: do not even ask the server
        }
        const result = await next(document, position, context, token);
        const items = Array.isArray(result) ? result : result?.items ?? [];
        const uri = document.uri.toString();
        items.forEach((item, i) => {
          const text = typeof item.insertText === "string" ? item.insertText : item.insertText.value;
          item.command = { command: "dlm._didAccept", title: "dlm: accepted", arguments: [uri, text] };
          if (i === 0) {
            const start = item.range ? item.range.start : position;
            lastShown = { uri, offset: document.offsetAt(start), text };
            client?.sendNotification("dlm/didShowCompletion", { uri });
          }
        });
        return result;
      },
    },
  };
}

async function startClient(): Promise<void> {
  if (restartTimer) {
    clearTimeout(restartTimer);
    restartTimer = undefined;
  }
  const config = vscode.workspace.getConfiguration(SECTION);
  const command = config.get<string>("server.path") || "dlm-lsp";
  const args = config.get<string[]>("server.args") ?? [];
  const executable = findExecutable(command);
  if (!executable) {
    const message = `dlm: the server "${command}" was not found. Install it from a clone of dlm-lsp ("python3 -m venv .venv && .venv/bin/pip install -e ." in the clone; it is not on PyPI, where "dlm-lsp" is an unrelated project) and set "dlm.server.path" to the clone's .venv/bin/dlm-lsp.`;
    log.error(message);
    setStatus("error", "server not found");
    void vscode.window.showErrorMessage(message, "Open Settings").then((choice) => {
      if (choice) {
        void vscode.commands.executeCommand("workbench.action.openSettings", "dlm.server.path");
      }
    });
    return;
  }
  if (client) {
    const old = client;
    client = undefined;
    stopping = true;
    try {
      if (old.state === State.Running) {
        await old.stop(2000);
      }
    } catch (err) {
      log.warn(`stopping the old client: ${err}`);
    }
    await old.dispose();
  }
  stopping = false;
  const serverOptions: ServerOptions = { command: executable, args, options: { env: process.env } };
  client = new LanguageClient("dlm", "dlm", serverOptions, clientOptions());
  setStatus("loading", "starting the server");
  log.info(`starting ${executable} ${args.join(" ")}`);
  try {
    await client.start();
  } catch (err) {
    log.error(`the server failed to start: ${err}`);
    setStatus("error", `the server failed to start: ${err}`);
    return;
  }
  void pollStatus();
}

async function setEnabled(enabled: boolean, languageId?: string): Promise<void> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const enable = { ...(config.get<Record<string, boolean>>("enable") ?? {}) };
  enable[languageId ?? "*"] = enabled;
  await config.update("enable", enable, vscode.ConfigurationTarget.Global);
  void vscode.window.setStatusBarMessage(`dlm: completions ${enabled ? "enabled" : "disabled"}${languageId ? ` for ${languageId}` : ""}`, 3000);
  void pollStatus();
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  log = vscode.window.createOutputChannel("dlm", { log: true });
  statusItem = vscode.window.createStatusBarItem("dlm.status", vscode.StatusBarAlignment.Right, 100);
  statusItem.name = "dlm";
  const currentLanguage = () => vscode.window.activeTextEditor?.document.languageId;
  context.subscriptions.push(
    log,
    statusItem,
    vscode.commands.registerCommand("dlm.enable", () => setEnabled(true)),
    vscode.commands.registerCommand("dlm.disable", () => setEnabled(false)),
    vscode.commands.registerCommand("dlm.enableLanguage", () => setEnabled(true, currentLanguage())),
    vscode.commands.registerCommand("dlm.disableLanguage", () => setEnabled(false, currentLanguage())),
    vscode.commands.registerCommand("dlm.restartServer", () => {
      restarts = [];
      return startClient();
    }),
    vscode.commands.registerCommand("dlm.showLog", () => log.show()),
    vscode.commands.registerCommand("dlm.showStatus", async () => {
      if (!client || client.state !== State.Running) {
        void vscode.window.showWarningMessage("dlm: the server is not running.", "Restart").then((c) => c && startClient());
        return;
      }
      const s = await client.sendRequest<ServerStatus>("dlm/status", {});
      const lines = [
        `model ${s.state}: ${s.model} on ${s.backend} (${s.device})`,
        s.error ? `error: ${s.error}` : "",
        `latency last ${s.last_latency_ms ?? "-"} ms, median ${s.median_latency_ms ?? "-"} ms`,
        `requests ${s.requests}, completions ${s.completions}, shown ${s.shown}, accepted ${s.accepted} (+${s.partially_accepted} partly)`,
        s.gated ? `${s.gated} hidden by the confidence gate (dlm.minConfidence)` : "",
      ].filter(Boolean);
      void vscode.window.showInformationMessage(`dlm: ${lines.join(" · ")}`);
    }),
    vscode.commands.registerCommand("dlm._didAccept", (uri: string, text: string) => {
      const editor = vscode.window.activeTextEditor;
      lastShown = undefined;
      const position = editor?.selection.active;
      client?.sendNotification("dlm/didAcceptCompletion", {
        acceptedLength: text.length,
        uri,
        ...(position ? { position: { line: position.line, character: position.character } } : {}),
      });
    }),
    vscode.workspace.onDidChangeTextDocument((event) => {
      // VS Code's "accept word"/"accept line" insert a prefix of the suggestion in one edit.
      const shown = lastShown;
      if (!shown || event.document.uri.toString() !== shown.uri || event.contentChanges.length !== 1) {
        return;
      }
      const change = event.contentChanges[0];
      if (change.rangeLength === 0 && change.rangeOffset === shown.offset && change.text.length >= 2 && change.text.length < shown.text.length && shown.text.startsWith(change.text)) {
        client?.sendNotification("dlm/didPartiallyAcceptCompletion", { acceptedLength: change.text.length });
        lastShown = { uri: shown.uri, offset: shown.offset + change.text.length, text: shown.text.slice(change.text.length) };
      }
    }),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration("dlm.server")) {
        void vscode.window.showInformationMessage("dlm: server settings changed; restarting the server.");
        restarts = [];
        void startClient();
      } else if (event.affectsConfiguration(SECTION)) {
        void pollStatus();
      }
    }),
    { dispose: () => pollTimer && clearInterval(pollTimer) },
  );
  pollTimer = setInterval(() => void pollStatus(), STATUS_POLL_MS);
  await startClient();
}

export async function deactivate(): Promise<void> {
  stopping = true;
  if (restartTimer) {
    clearTimeout(restartTimer);
  }
  if (client && client.state === State.Running) {
    await client.stop();
  }
}
