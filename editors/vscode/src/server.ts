// The language server process: finding it, starting it with the settings, restarting it
// with backoff when it crashes, and reporting shown/accepted suggestions to it.
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
import { SECTION, serverSettings } from "./settings";
import { ServerStatus, StatusBar } from "./status";

const MAX_RESTARTS = 5;
const RESTART_WINDOW_MS = 3 * 60 * 1000;

/** What was last shown in a document, to recognise partial accepts (word/line) from the edits they make. */
type Shown = { uri: string; offset: number; text: string };

/** Resolve the server executable on PATH (or as given); undefined when it cannot be found. */
export function findExecutable(command: string): string | undefined {
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

export class Server implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private restarts: number[] = [];
  private restartTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  private lastShown: Shown | undefined;

  constructor(
    private readonly log: vscode.LogOutputChannel,
    private readonly status: StatusBar,
  ) {}

  get running(): boolean {
    return this.client?.state === State.Running;
  }

  /** Start (or restart) the server with the current settings. */
  async start(): Promise<void> {
    this.clearRestartTimer();
    const config = vscode.workspace.getConfiguration(SECTION);
    const command = config.get<string>("server.path") || "dlm-lsp";
    const args = config.get<string[]>("server.args") ?? [];
    const executable = findExecutable(command);
    if (!executable) {
      this.reportMissing(command);
      return;
    }
    await this.stopClient();
    const serverOptions: ServerOptions = { command: executable, args, options: { env: process.env } };
    const client = new LanguageClient("dlm", "dlm", serverOptions, this.clientOptions());
    client.onNotification("dlm/didChangeStatus", (s: ServerStatus) => this.status.update(s));
    this.client = client;
    this.status.set("loading", "starting the server");
    this.log.info(`starting ${executable} ${args.join(" ")}`);
    try {
      await client.start();
    } catch (err) {
      this.log.error(`the server failed to start: ${err}`);
      this.status.set("error", `the server failed to start: ${err}`);
      return;
    }
    const initial = await this.requestStatus();
    if (initial) {
      this.status.update(initial);
    }
  }

  /** A start that forgets earlier crashes (the user asked for it). */
  restart(): Promise<void> {
    this.restarts = [];
    return this.start();
  }

  /** The server's `dlm/status`, or undefined when it is not running or does not answer. */
  async requestStatus(): Promise<ServerStatus | undefined> {
    if (!this.client || !this.running) {
      return undefined;
    }
    try {
      return await this.client.sendRequest<ServerStatus>("dlm/status", {});
    } catch (err) {
      this.log.debug(`dlm/status failed: ${err}`);
      return undefined;
    }
  }

  /** The user accepted a whole suggestion (Tab): counted by the server, which prefetches the next one. */
  didAccept(uri: string, text: string): void {
    const position = vscode.window.activeTextEditor?.selection.active;
    this.lastShown = undefined;
    this.client?.sendNotification("dlm/didAcceptCompletion", {
      acceptedLength: text.length,
      uri,
      ...(position ? { position: { line: position.line, character: position.character } } : {}),
    });
  }

  /** VS Code's "accept word"/"accept line" insert a prefix of the suggestion in one edit: count it. */
  onDidChangeTextDocument(event: vscode.TextDocumentChangeEvent): void {
    const shown = this.lastShown;
    if (!shown || event.document.uri.toString() !== shown.uri || event.contentChanges.length !== 1) {
      return;
    }
    const change = event.contentChanges[0];
    const partOfIt = change.text.length >= 2 && change.text.length < shown.text.length && shown.text.startsWith(change.text);
    if (change.rangeLength === 0 && change.rangeOffset === shown.offset && partOfIt) {
      this.client?.sendNotification("dlm/didPartiallyAcceptCompletion", { acceptedLength: change.text.length });
      this.lastShown = { uri: shown.uri, offset: shown.offset + change.text.length, text: shown.text.slice(change.text.length) };
    }
  }

  async dispose(): Promise<void> {
    this.clearRestartTimer();
    await this.stopClient();
  }

  private reportMissing(command: string): void {
    const message = `dlm: the server "${command}" was not found. Install it from a clone of dlm-lsp ("python3 -m venv .venv && .venv/bin/pip install -e ." in the clone; it is not on PyPI, where "dlm-lsp" is an unrelated project) and set "dlm.server.path" to the clone's .venv/bin/dlm-lsp.`;
    this.log.error(message);
    this.status.set("error", "server not found");
    void vscode.window.showErrorMessage(message, "Open Settings").then((choice) => {
      if (choice) {
        void vscode.commands.executeCommand("workbench.action.openSettings", "dlm.server.path");
      }
    });
  }

  private async stopClient(): Promise<void> {
    const old = this.client;
    if (!old) {
      return;
    }
    this.client = undefined;
    this.stopping = true;
    try {
      if (old.state === State.Running) {
        await old.stop(2000);
      }
    } catch (err) {
      this.log.warn(`stopping the old client: ${err}`);
    }
    await old.dispose();
    this.stopping = false;
  }

  private clearRestartTimer(): void {
    if (this.restartTimer) {
      clearTimeout(this.restartTimer);
      this.restartTimer = undefined;
    }
  }

  private clientOptions(): LanguageClientOptions {
    return {
      documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
      // statusNotifications: the server pushes dlm/didChangeStatus, so the status bar needs no polling
      initializationOptions: { [SECTION]: serverSettings(), statusNotifications: true },
      synchronize: { configurationSection: SECTION },
      outputChannel: this.log,
      errorHandler: this.errorHandler(),
      middleware: {
        // the server decides whether completions are on for a language: it answers nothing when not
        provideInlineCompletionItems: async (document, position, context, token, next) => {
          const result = await next(document, position, context, token);
          const items = Array.isArray(result) ? result : result?.items ?? [];
          const uri = document.uri.toString();
          items.forEach((item, i) => {
            const text = typeof item.insertText === "string" ? item.insertText : item.insertText.value;
            item.command = { command: "dlm._didAccept", title: "dlm: accepted", arguments: [uri, text] };
            if (i === 0) {
              const start = item.range ? item.range.start : position;
              this.lastShown = { uri, offset: document.offsetAt(start), text };
              this.client?.sendNotification("dlm/didShowCompletion", { uri });
            }
          });
          return result;
        },
      },
    };
  }

  /** Restart with backoff (1, 2, 4, 8, 16 s); after MAX_RESTARTS within RESTART_WINDOW_MS, stop and say so. */
  private errorHandler(): ErrorHandler {
    return {
      error: (): ErrorHandlerResult => ({ action: ErrorAction.Continue, handled: true }),
      closed: (): CloseHandlerResult => {
        if (this.stopping) {
          return { action: CloseAction.DoNotRestart, handled: true };
        }
        const now = Date.now();
        this.restarts = this.restarts.filter((t) => now - t < RESTART_WINDOW_MS);
        if (this.restarts.length >= MAX_RESTARTS) {
          const message = `dlm-lsp stopped ${this.restarts.length} times in 3 minutes; not restarting. Check the log, then run "dlm: Restart the server".`;
          this.status.set("error", "the server keeps crashing");
          void vscode.window.showErrorMessage(message, "Show Log").then((choice) => choice && this.log.show());
          return { action: CloseAction.DoNotRestart, message, handled: true };
        }
        this.restarts.push(now);
        const delay = 1000 * 2 ** (this.restarts.length - 1);
        this.log.warn(`dlm-lsp exited; restarting in ${delay / 1000} s (${this.restarts.length}/${MAX_RESTARTS})`);
        this.status.set("error", `the server exited; restarting in ${delay / 1000} s`);
        this.restartTimer = setTimeout(() => void this.start(), delay);
        return { action: CloseAction.DoNotRestart, handled: true };
      },
    };
  }
}
