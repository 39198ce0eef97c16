// The status bar item, driven by the server's `dlm/didChangeStatus` pushes (no polling).
import * as vscode from "vscode";

/** The `dlm/status` payload (pushed as `dlm/didChangeStatus`). */
export type ServerStatus = {
  state?: string;
  error?: string | null;
  enabled?: boolean;
  model?: string | null;
  /** A catalog model the settings name that is not downloaded (the demo model runs meanwhile). */
  missing?: string | null;
  /** The catalog model being downloaded and converted. */
  pulling?: string | null;
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

export type StatusKind = "loading" | "ready" | "error" | "disabled" | "stopped";

const ICONS: Record<StatusKind, string> = {
  loading: "$(sync~spin)",
  ready: "$(check)",
  error: "$(error)",
  disabled: "$(circle-slash)",
  stopped: "$(debug-stop)",
};
const COMMANDS: Record<StatusKind, string> = {
  error: "dlm.showLog",
  disabled: "dlm.enable",
  stopped: "dlm.restartServer",
  loading: "dlm.showStatus",
  ready: "dlm.showStatus",
};

export class StatusBar implements vscode.Disposable {
  private readonly item: vscode.StatusBarItem;

  constructor() {
    this.item = vscode.window.createStatusBarItem("dlm.status", vscode.StatusBarAlignment.Right, 100);
    this.item.name = "dlm";
  }

  /** Show one state; `detail` is the latency (ready), the model (loading) or what went wrong. */
  set(kind: StatusKind, detail = ""): void {
    this.item.text = `${ICONS[kind]} dlm${detail && kind === "ready" ? ` ${detail}` : ""}`;
    this.item.tooltip = {
      loading: `dlm: loading the model… ${detail}`,
      ready: `dlm: ready${detail ? ` (last completion ${detail})` : ""}. Click for status.`,
      error: `dlm: ${detail}. Click to show the log.`,
      disabled: "dlm: completions are disabled. Click to enable.",
      stopped: `dlm: the server is not running. ${detail}`,
    }[kind];
    this.item.command = COMMANDS[kind];
    this.item.backgroundColor = kind === "error" ? new vscode.ThemeColor("statusBarItem.errorBackground") : undefined;
    this.item.show();
  }

  /** Show what the server says about itself. */
  update(s: ServerStatus): void {
    if (s.enabled === false) {
      this.set("disabled");
    } else if (s.state === "ready") {
      this.set("ready", s.last_latency_ms != null ? `${Math.round(s.last_latency_ms)} ms` : "");
    } else if (s.state === "error") {
      this.set("error", `model failed to load: ${s.error ?? "unknown error"}`);
    } else {
      this.set("loading", s.model ?? "");
    }
  }

  dispose(): void {
    this.item.dispose();
  }
}

/** One line for "dlm: Show status". */
export function statusMessage(s: ServerStatus): string {
  const lines = [
    `model ${s.state}: ${s.model} on ${s.backend} (${s.device})`,
    s.error ? `error: ${s.error}` : "",
    s.pulling ? `downloading ${s.pulling}` : "",
    s.missing && !s.pulling ? `${s.missing} is not downloaded: the demo model runs (dlm-lsp models pull ${s.missing})` : "",
    `latency last ${s.last_latency_ms ?? "-"} ms, median ${s.median_latency_ms ?? "-"} ms`,
    `requests ${s.requests}, completions ${s.completions}, shown ${s.shown}, accepted ${s.accepted} (+${s.partially_accepted} partly)`,
    s.gated ? `${s.gated} hidden by the confidence gate (dlm.minConfidence)` : "",
  ].filter(Boolean);
  return `dlm: ${lines.join(" · ")}`;
}
