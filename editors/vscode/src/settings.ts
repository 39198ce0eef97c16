// The `dlm.*` settings: what the server gets, and the enable switches the commands write.
// The server owns every policy (validation, defaults, which languages are on); the
// extension only passes the section through and edits the user's settings.json.
import * as vscode from "vscode";

export const SECTION = "dlm";

/** The server's settings: the `dlm` section without the client-only `dlm.server.*` keys. */
export function serverSettings(): Record<string, unknown> {
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

/** Turn completions on or off everywhere (`*`) or for one language in the user settings; the server applies it. */
export async function setEnabled(enabled: boolean, languageId?: string): Promise<void> {
  const config = vscode.workspace.getConfiguration(SECTION);
  const enable = { ...(config.get<Record<string, boolean>>("enable") ?? {}) };
  enable[languageId ?? "*"] = enabled;
  await config.update("enable", enable, vscode.ConfigurationTarget.Global);
  void vscode.window.setStatusBarMessage(`dlm: completions ${enabled ? "enabled" : "disabled"}${languageId ? ` for ${languageId}` : ""}`, 3000);
}
