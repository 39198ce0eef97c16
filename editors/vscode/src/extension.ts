// dlm for VS Code: launches the dlm-lsp language server and shows its inline completions.
//
// The extension stays thin: it starts the server (server.ts), passes the `dlm.*`
// settings through (settings.ts: initializationOptions, workspace/configuration,
// didChangeConfiguration), shows the status the server pushes (status.ts), and reports
// shown/accepted suggestions to the server's local counters. Completion itself is
// vscode-languageclient's inline completion feature.
import * as vscode from "vscode";
import { Server } from "./server";
import { SECTION, setEnabled } from "./settings";
import { StatusBar, statusMessage } from "./status";

let server: Server | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const log = vscode.window.createOutputChannel("dlm", { log: true });
  const status = new StatusBar();
  const current = new Server(log, status);
  server = current;
  const currentLanguage = () => vscode.window.activeTextEditor?.document.languageId;
  context.subscriptions.push(
    log,
    status,
    vscode.commands.registerCommand("dlm.enable", () => setEnabled(true)),
    vscode.commands.registerCommand("dlm.disable", () => setEnabled(false)),
    vscode.commands.registerCommand("dlm.enableLanguage", () => setEnabled(true, currentLanguage())),
    vscode.commands.registerCommand("dlm.disableLanguage", () => setEnabled(false, currentLanguage())),
    vscode.commands.registerCommand("dlm.restartServer", () => current.restart()),
    vscode.commands.registerCommand("dlm.showLog", () => log.show()),
    vscode.commands.registerCommand("dlm.showStatus", async () => {
      if (!current.running) {
        void vscode.window.showWarningMessage("dlm: the server is not running.", "Restart").then((c) => c && current.restart());
        return;
      }
      const s = await current.requestStatus();
      if (!s) {
        void vscode.window.showWarningMessage("dlm: the server did not answer dlm/status (see the log).", "Show Log").then((c) => c && log.show());
        return;
      }
      void vscode.window.showInformationMessage(statusMessage(s));
    }),
    vscode.commands.registerCommand("dlm._didAccept", (uri: string, text: string) => current.didAccept(uri, text)),
    vscode.workspace.onDidChangeTextDocument((event) => current.onDidChangeTextDocument(event)),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration(`${SECTION}.server`)) {
        void vscode.window.showInformationMessage("dlm: server settings changed; restarting the server.");
        void current.restart();
      }
      // other dlm.* changes reach the server through the language client, which pushes its new status
    }),
  );
  await current.start();
}

export async function deactivate(): Promise<void> {
  await server?.dispose();
}
