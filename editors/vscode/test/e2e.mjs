// Drives a real VS Code (code-server in Debian's Chromium, via playwright-core) with the
// packaged dlm extension and the real dlm-lsp server. Run by tests/editors/test_vscode.py:
//
//   node e2e.mjs CONFIG.json
//
// CONFIG: { e2eDir, codeServer, workspace, userDataDir, extensionsDir, port, file, line,
//           settingsFile, chromium, screenshots, scenario: "complete" | "errors" | "endOfFile" | "download" | "reload",
//           download, pulledModel (the "download" scenario), modelFrom, modelTo (the "reload" scenario) }. Prints one JSON object of observations on stdout; the
// Python test asserts on it and on the files the editor saved.
import { spawn } from "node:child_process";
import { cpSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(config.e2eDir, "package.json"));
const { chromium } = require("playwright-core");

const log = (...args) => console.error("[e2e]", ...args);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const out = { steps: [] };

async function waitForServer(url, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(url);
      if (res.ok) return;
    } catch {}
    await sleep(250);
  }
  throw new Error(`code-server did not answer at ${url}`);
}

async function ghostText(page) {
  const nodes = page.locator("[class*=ghost-text]");
  const n = await nodes.count();
  const parts = [];
  for (let i = 0; i < n; i++) parts.push(await nodes.nth(i).innerText().catch(() => ""));
  return parts.join("");
}

async function statusText(page) {
  const item = page.locator('.statusbar-item[id$="dlm.status"]').first();
  if ((await item.count()) === 0) return "";
  // one read of the DOM: the label and the icon read apart can straddle an update (the CI saw a
  // "loading" label with the error icon)
  return item.evaluate((el) => {
    const classes = [...el.querySelectorAll(".codicon")].map((e) => e.className).join(" ");
    return `${el.getAttribute("aria-label") ?? ""} ${classes}`;
  });
}

async function waitFor(what, fn, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await fn();
    if (last) return last;
    await sleep(200);
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

async function runCommand(page, title) {
  await page.keyboard.press("F1");
  await page.locator(".quick-input-widget input").waitFor({ timeout: 10_000 });
  await page.keyboard.type(title);
  await page.locator(".quick-input-list .monaco-list-row", { hasText: title.replace(/^dlm: /, "") }).first().waitFor({ timeout: 10_000 });
  await page.keyboard.press("Enter");
}

async function goToLineEnd(page, line) {
  await page.keyboard.press("Control+G");
  await page.keyboard.type(String(line));
  await page.keyboard.press("Enter");
  await page.keyboard.press("End");
}

const server = spawn(
  process.execPath,
  [
    path.join(config.codeServer, "out/node/entry.js"),
    "--config", path.join(config.userDataDir, "code-server.yaml"),
    "--bind-addr", `127.0.0.1:${config.port}`,
    "--auth", "none",
    "--user-data-dir", config.userDataDir,
    "--extensions-dir", config.extensionsDir,
    "--disable-telemetry",
    "--disable-update-check",
    "--disable-workspace-trust",
    config.workspace,
  ],
  // its sockets and temporary files stay in the test's folder
  { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, TMPDIR: config.userDataDir } },
);
server.stdout.on("data", (d) => log(`code-server: ${d}`.trim()));
server.stderr.on("data", (d) => log(`code-server: ${d}`.trim()));

/** A broken setup: the status bar turns into an error and a notification says why. */
async function scenarioErrors(page) {
  out.statusError = await waitFor("an error in the status bar", async () => {
    const s = await statusText(page);
    return s.includes("codicon-error") ? s : "";
  }, 120_000);
  out.notifications = await waitFor("an error notification", async () => {
    return (await page.locator(".notification-list-item-message").allInnerTexts()).join("\n");
  }, 30_000);
  out.steps.push("error-shown");
}

/** The model folder is missing (an error); it appears (copied from modelFrom); "dlm: Reload the model"
 * loads it without restarting anything. */
async function scenarioReload(page) {
  await scenarioErrors(page);
  cpSync(config.modelFrom, config.modelTo, { recursive: true });
  await runCommand(page, "dlm: Reload the model");
  out.statusReloaded = await waitFor("the model to be ready after the reload", async () => {
    const s = await statusText(page);
    return s.includes("codicon-check") ? s : "";
  }, 120_000);
  out.steps.push("reloaded");
}

async function waitReady(page) {
  out.statusLoading = await waitFor("the dlm status bar item", () => statusText(page), 60_000);
  out.statusReady = await waitFor("the model to be ready", async () => {
    const s = await statusText(page);
    return s.includes("codicon-check") ? s : "";
  }, 120_000);
  out.steps.push("ready");
}

/** In an empty file (no final newline: the cursor is at the very end of the document), type a
 * function; ghost text must appear at the cursor; Tab accepts it; save. */
async function scenarioEndOfFile(page) {
  await waitReady(page);
  await page.locator(".monaco-editor textarea").first().focus();
  await page.keyboard.type("def add(a, b):", { delay: 40 });
  await page.keyboard.press("Enter"); // VS Code indents the body
  await page.keyboard.type("return ", { delay: 40 });
  out.ghost = await waitFor("ghost text at the end of the file", () => ghostText(page), 30_000);
  out.steps.push("ghost");
  if (config.screenshots) {
    const box = await page.locator(".monaco-editor").first().boundingBox();
    const clip = { x: box.x, y: box.y, width: Math.min(box.width, 720), height: 80 };
    await page.screenshot({ path: path.join(config.screenshots, "ghost.png"), clip });
  }
  await page.keyboard.press("Tab");
  await sleep(300);
  await page.keyboard.press("Control+S");
  await sleep(1000);
  out.steps.push("accepted");
}

/** Type, see ghost text, accept a word then the rest, save; then settings through commands. */
async function scenarioComplete(page) {
  await waitReady(page);

  await page.locator(".monaco-editor textarea").first().focus();
  await goToLineEnd(page, config.line);
  await page.keyboard.type("return ", { delay: 40 });
  out.ghost = await waitFor("ghost text", () => ghostText(page), 30_000);
  out.steps.push("ghost");
  // VS Code's Accept Next Word (Ctrl+Right) takes the leading blank, then the first word; Tab the rest
  await page.keyboard.press("Control+ArrowRight");
  await sleep(300);
  await page.keyboard.press("Control+ArrowRight");
  await sleep(500);
  out.ghostAfterWordAccept = await ghostText(page);
  await page.keyboard.press("Tab");
  await sleep(300);
  await page.keyboard.press("Escape");
  await page.keyboard.press("Control+S");
  await sleep(1000);
  out.steps.push("accepted");

  // change a setting through the extension's command (it writes dlm.enable to the user
  // settings.json): completions off for Python -> no ghost text; back on -> ghost text again
  await runCommand(page, "dlm: Disable completions for the current language");
  await sleep(1500);
  await goToLineEnd(page, config.line + 1);
  await page.keyboard.press("Enter");
  await page.keyboard.type("total = s", { delay: 40 });
  await sleep(3000);
  out.ghostWhileDisabled = await ghostText(page);
  await runCommand(page, "dlm: Enable completions for the current language");
  await sleep(1500);
  await page.keyboard.press("Backspace"); // retype the last character: the same text as while disabled
  await page.keyboard.type("s", { delay: 40 });
  out.ghostAfterReenable = await waitFor("ghost text after re-enabling", () => ghostText(page), 30_000);
  await runCommand(page, "dlm: Show status");
  out.statusMessage = await waitFor("the status message", async () => {
    const toast = page.locator(".notification-list-item-message", { hasText: "requests" });
    return (await toast.count()) ? await toast.first().innerText() : "";
  }, 10_000);
  out.steps.push("settings"); // these edits stay unsaved: the file on disk holds the accepted text
}

/** The settings name a catalog model that is not downloaded: the demo model runs, a notification
 * offers the download (the server's window/showMessageRequest); Download pulls and loads it, and
 * "dlm: Show status" then names the pulled model; ghost text comes from it. */
async function scenarioDownload(page) {
  await waitReady(page);
  const button = page.locator(".notification-list-item .monaco-button", { hasText: config.download });
  await button.first().waitFor({ timeout: 60_000 });
  out.offer = await page.locator(".notification-list-item-message", { hasText: "not downloaded" }).first().innerText();
  out.buttons = await page.locator(".notification-list-item .monaco-button").allInnerTexts();
  out.steps.push("offered");
  await button.first().click();
  out.statusMessage = await waitFor("the pulled model in the status", async () => {
    await runCommand(page, "dlm: Show status");
    await sleep(500);
    const toast = page.locator(".notification-list-item-message", { hasText: config.pulledModel });
    const text = (await toast.count()) ? await toast.first().innerText() : "";
    return text.includes("model ready") ? text : "";
  }, 180_000);
  out.steps.push("pulled");
  await page.locator(".monaco-editor textarea").first().focus();
  await goToLineEnd(page, config.line);
  await page.keyboard.type("return ", { delay: 40 });
  out.ghost = await waitFor("ghost text from the pulled model", () => ghostText(page), 30_000);
  out.steps.push("ghost");
}

let browser;
let exitCode = 0;
try {
  await waitForServer(`http://127.0.0.1:${config.port}/healthz`, 60_000);
  browser = await chromium.launch({
    executablePath: config.chromium,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(`http://127.0.0.1:${config.port}/?folder=${encodeURIComponent(config.workspace)}`);
  await page.locator(".monaco-workbench").waitFor({ timeout: 60_000 });
  out.steps.push("workbench");
  await page.locator(".explorer-folders-view .monaco-list-row", { hasText: path.basename(config.file) }).first().click({ timeout: 30_000 });
  await page.locator(".monaco-editor .view-lines").first().waitFor({ timeout: 30_000 });
  out.steps.push("editor");
  const scenarios = {
    errors: scenarioErrors, complete: scenarioComplete, endOfFile: scenarioEndOfFile, download: scenarioDownload,
    reload: scenarioReload,
  };
  await scenarios[config.scenario](page);
  if (config.screenshots) await page.screenshot({ path: path.join(config.screenshots, "final.png") });
} catch (err) {
  out.error = String(err && err.stack ? err.stack : err);
  exitCode = 1;
  try {
    const pages = browser ? browser.contexts().flatMap((c) => c.pages()) : [];
    if (pages[0] && config.screenshots) await pages[0].screenshot({ path: path.join(config.screenshots, "failure.png") });
  } catch {}
} finally {
  if (browser) await browser.close().catch(() => {});
  server.kill("SIGTERM");
}
console.log(JSON.stringify(out));
process.exit(exitCode);
