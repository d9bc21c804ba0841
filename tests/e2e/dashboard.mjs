// Drives the dashboard (/_/) in Debian's headless Chromium with playwright-core, for
// tests/test_dashboard.py: one browser and one page for the whole module. Reads one JSON command a
// line on stdin ({"id", "scenario", "args"}), answers one JSON line on stdout ({"id", "ok", "result"
// | "error"}). The scenarios act as a person would (labels, buttons, the keyboard) and report what
// the page showed; the Python side checks the server's side.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const [base] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const profile = fs.mkdtempSync(path.join(os.tmpdir(), "dashboard-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 1200, height: 900 },
  acceptDownloads: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = context.pages()[0] || (await context.newPage());
page.setDefaultTimeout(30000);
const requests = [];
const problems = [];
const tokens = []; // every auth token the server handed the page: none may appear in a URL
page.on("response", async (r) => {
  if (/\/auth-(with-password|refresh)$/.test(r.url()) && r.status() === 200) {
    try {
      tokens.push((await r.json()).token);
    } catch {
      // the page went on before the body was read
    }
  }
});
page.on("request", (r) => requests.push(r.url()));
if (process.env.DASHBOARD_DEBUG) page.on("response", (r) => process.stderr.write(`${r.status()} ${r.request().method()} ${r.url()}\n`));
page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
page.on("console", (m) => {
  // The refusals the scenarios provoke (400, 401, 404) are logged by Chromium as failed loads.
  if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console: ${m.text()}`);
});
page.on("dialog", (d) => {
  problems.push(`native dialog: ${d.message()}`);
  d.dismiss();
});

const text = async (selector) => ((await page.locator(selector).first().textContent()) || "").trim();
const row = (key) => page.locator(`#backups-body tr[data-key="${key}"]`);

async function waitText(selector, pattern, timeout = 30000) {
  await page.waitForFunction(([s, p]) => {
    const el = document.querySelector(s);
    return !!el && new RegExp(p).test(el.textContent || "");
  }, [selector, pattern], { timeout });
  return text(selector);
}

async function signedIn({ email, password }) {
  if (!page.url().startsWith(base)) await page.goto(`${base}/_/`);
  if (await page.locator("#session").isVisible()) return;
  await page.locator("#view-signin").waitFor({ state: "visible" });
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#session").waitFor({ state: "visible" });
}

async function backupsView() {
  if (!page.url().endsWith("#/backups")) {
    await page.getByRole("link", { name: "Backups" }).click();
  }
  await page.locator("#view-backups").waitFor({ state: "visible" });
}

const scenarios = {
  async signin({ email, password }) {
    const out = {};
    const response = await page.goto(`${base}/_/`);
    out.csp = response.headers()["content-security-policy"];
    await page.locator("#view-signin").waitFor({ state: "visible" });
    await page.getByLabel("Email").fill(email);
    await page.getByLabel("Password").fill("wrong-password");
    await page.getByRole("button", { name: "Sign in" }).click();
    out.wrongPassword = await waitText("#signin-error", ".");
    // The keyboard only: the email field has the focus, Tab to the password, Enter submits.
    await page.getByLabel("Email").fill("");
    await page.getByLabel("Email").focus();
    await page.keyboard.type(email);
    await page.keyboard.press("Tab");
    await page.keyboard.type(password);
    await page.keyboard.press("Enter");
    await page.locator("#session").waitFor({ state: "visible" });
    out.who = await text("#session-who");
    out.expiry = await text("#session-expiry");
    out.stored = await page.evaluate(() => JSON.parse(localStorage.getItem("pocketbase_auth")));
    const refreshed = page.waitForResponse((r) => r.url().endsWith("/auth-refresh"));
    await page.getByRole("button", { name: "Refresh session" }).click();
    out.refreshStatus = (await refreshed).status();
    out.refreshMessage = await waitText("#messages", "Session refreshed");
    await page.getByRole("button", { name: "Sign out" }).click();
    await page.locator("#view-signin").waitFor({ state: "visible" });
    out.storedAfterSignOut = await page.evaluate(() => localStorage.getItem("pocketbase_auth"));
    // A saved token past its expiry: the sign-in form says so. A token the server refuses (a
    // forged signature, not expired): the same, with the server's reason.
    const fake = (exp) => {
      const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
      return `${part({ alg: "HS256", typ: "JWT" })}.${part({ id: "x", collectionId: "pbc_3142635823", type: "auth", exp, refreshable: true })}.c2ln`;
    };
    for (const [name, exp] of [["expired", Math.floor(Date.now() / 1000) - 60], ["forged", Math.floor(Date.now() / 1000) + 3600]]) {
      await page.evaluate((token) => localStorage.setItem("pocketbase_auth", JSON.stringify({ token, record: { email: "x" } })), fake(exp));
      await page.reload();
      await page.locator("#view-signin").waitFor({ state: "visible" });
      out[name] = await waitText("#signin-error", ".");
    }
    await signedIn({ email, password });
    return out;
  },

  async create({ gate, name, existing }) {
    await backupsView();
    const out = {};
    const field = page.getByLabel("New backup name (optional)");
    await field.fill("Bad Name.zip");
    await page.getByRole("button", { name: "Create backup" }).click();
    out.invalid = await waitText("#create-error", ".");
    await field.fill(existing);
    await page.getByRole("button", { name: "Create backup" }).click();
    out.exists = await waitText("#create-error", "exists");
    // The job is held by the fault gate after its first archive entry: the bar shows part done.
    fs.writeFileSync(gate, "1");
    await field.fill(name);
    await page.getByRole("button", { name: "Create backup" }).click();
    await page.waitForFunction(() => {
      const bar = document.querySelector("#job-active progress");
      return bar && bar.max > 1 && bar.value > 0;
    });
    out.held = await page.evaluate(() => {
      const bar = document.querySelector("#job-active progress");
      return { value: bar.value, max: bar.max, text: document.querySelector("#job-active").textContent };
    });
    if (process.env.DASHBOARD_SHOTS) await page.screenshot({ path: path.join(process.env.DASHBOARD_SHOTS, "dashboard-backup-running.png") });
    fs.unlinkSync(gate);
    out.last = await waitText("#job-last", `${name.replace(/\./g, "\\.")} succeeded`);
    await row(name).waitFor();
    out.idle = await text("#job-active");
    out.row = {
      date: await text(`#backups-body tr[data-key="${name}"] td.date`),
      size: await text(`#backups-body tr[data-key="${name}"] td.size`),
      creator: await text(`#backups-body tr[data-key="${name}"] td.creator`),
    };
    out.order = await page.locator("#backups-body tr").evaluateAll((rows) => rows.map((r) => r.dataset.key));
    if (process.env.DASHBOARD_SHOTS) await page.screenshot({ path: path.join(process.env.DASHBOARD_SHOTS, "dashboard-idle.png") });
    return out;
  },

  async upload({ file, badFile }) {
    await backupsView();
    const out = {};
    const input = page.getByLabel("Upload a backup (.zip)");
    await input.setInputFiles(badFile);
    await page.getByRole("button", { name: "Upload", exact: true }).click();
    out.badName = await waitText("#upload-error", ".");
    // The browser's own upload progress, slowed down so that it has steps to show.
    const cdp = await context.newCDPSession(page);
    await cdp.send("Network.enable");
    await cdp.send("Network.emulateNetworkConditions",
      { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: 2 * 1024 * 1024 });
    await page.evaluate(() => {
      window.__uploadSeen = [];
      const bar = document.getElementById("upload-progress");
      new MutationObserver(() => window.__uploadSeen.push([bar.value, bar.max]))
        .observe(bar, { attributes: true, attributeFilter: ["value", "max"] });
    });
    await input.setInputFiles(file);
    await page.getByRole("button", { name: "Upload", exact: true }).click();
    out.done = await waitText("#upload-text", "Uploaded", 60000);
    await cdp.send("Network.emulateNetworkConditions", { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1 });
    await cdp.detach();
    out.seen = await page.evaluate(() => window.__uploadSeen);
    await row(path.basename(file)).waitFor();
    await page.waitForFunction((key) => document.querySelector(`#backups-body tr[data-key="${key}"] td.creator`)
      ?.textContent.startsWith("upload"), path.basename(file));
    out.creator = await text(`#backups-body tr[data-key="${path.basename(file)}"] td.creator`);
    return out;
  },

  async download({ key, saveTo }) {
    await backupsView();
    const started = page.waitForEvent("download");
    await page.getByRole("button", { name: `Download ${key}` }).click();
    const download = await started;
    requests.push(download.url()); // a download is the browser's, not the page's request
    await download.saveAs(saveTo);
    return { url: download.url(), filename: download.suggestedFilename(),
      token: await page.evaluate(() => JSON.parse(localStorage.getItem("pocketbase_auth")).token) };
  },

  async delete({ key }) {
    await backupsView();
    const out = {};
    await page.getByRole("button", { name: `Delete ${key}` }).click();
    out.dialog = await text("#delete-dialog p");
    await page.getByRole("button", { name: "Cancel", exact: true }).click();
    out.keptAfterCancel = await row(key).count();
    await page.getByRole("button", { name: `Delete ${key}` }).click();
    await page.locator("#delete-dialog").getByRole("button", { name: "Delete" }).click();
    await row(key).waitFor({ state: "detached" });
    out.message = await waitText("#messages", "Deleted");
    return out;
  },

  async restore({ key }) {
    await backupsView();
    await page.getByRole("button", { name: `Restore ${key}` }).click();
    const confirm = page.getByLabel(/Type .* to confirm/);
    await confirm.fill(key.slice(0, -1));
    const out = { disabledWhenWrong: await page.locator("#restore-submit").isDisabled() };
    await confirm.fill(key);
    await page.getByRole("button", { name: "Restore everything" }).click();
    await page.waitForFunction(() => document.getElementById("restore-result").textContent
      || document.getElementById("restore-error").textContent, null, { timeout: 120000 });
    out.result = await text("#restore-result");
    out.error = await text("#restore-error");
    out.last = await text("#job-last");
    await page.getByRole("button", { name: "Close", exact: true }).click();
    return out;
  },

  async partial({ key, collection }) {
    await backupsView();
    await page.getByRole("button", { name: `Restore ${key}` }).click();
    await page.getByLabel("Only some collections (online, no restart)").check();
    await page.locator("#restore-collections").getByLabel(collection, { exact: true }).check();
    await page.getByLabel("Mode").selectOption("merge");
    await page.getByRole("button", { name: "Preview (dry run)" }).click();
    const table = page.locator('[data-testid="restore-summary"]');
    await table.waitFor();
    const read = () => table.evaluate((t) => ({
      caption: t.caption.textContent,
      rows: [...t.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent)),
    }));
    const out = { preview: await read(), previewResult: await text("#restore-result") };
    if (process.env.DASHBOARD_SHOTS) await page.screenshot({ path: path.join(process.env.DASHBOARD_SHOTS, "dashboard-restore-preview.png") });
    await page.getByLabel(/Type .* to confirm/).fill(key);
    await page.getByRole("button", { name: "Restore these collections" }).click();
    await waitText("#restore-result", "Restored", 60000);
    out.result = await text("#restore-result");
    out.done = await read();
    await page.getByRole("button", { name: "Close", exact: true }).click();
    return out;
  },

  async settings({ s3, wrongSecret }) {
    await page.getByRole("link", { name: "Settings" }).click();
    const form = page.locator("#settings-form");
    await form.waitFor({ state: "visible" });
    const save = () => page.getByRole("button", { name: "Save settings" }).click();
    const fieldError = (p) => waitText(`[data-error="${p}"]`, ".");
    const out = {};
    await page.getByLabel("Automatic backups").selectOption("custom");
    await page.getByLabel("Cron expression").fill("every day");
    await save();
    out.cron = await fieldError("backups.cron");
    await page.getByLabel("Automatic backups").selectOption("0 0 * * *");
    out.presetCron = await page.getByLabel("Cron expression").inputValue();
    await page.getByLabel("Scheduled backups to keep (0: all)").fill("-1");
    await save();
    out.maxKeep = await fieldError("backups.cronMaxKeep");
    out.cronErrorCleared = await text('[data-error="backups.cron"]');
    await page.getByLabel("Scheduled backups to keep (0: all)").fill("4");
    await page.getByLabel("Store backups on S3").check();
    await save();
    out.bucket = await fieldError("backups.s3.bucket");
    out.endpoint = await fieldError("backups.s3.endpoint");
    await page.getByLabel("Bucket").fill(s3.bucket);
    await page.getByLabel("Region").fill(s3.region);
    await page.getByLabel("Endpoint").fill(s3.endpoint);
    await page.getByLabel("Access key").fill(s3.accessKey);
    await page.getByLabel(/^Secret/).fill(wrongSecret);
    await page.getByLabel("Force path-style addressing").check();
    await save();
    out.saved = await waitText("#settings-result", "Saved");
    await page.getByRole("button", { name: "Test the saved S3 connection" }).click();
    out.s3Failed = await waitText("#s3-result", "^(?!Testing)(.|\\n)+", 60000);
    await page.getByLabel(/^Secret/).fill(s3.secret);
    await save();
    await waitText("#settings-result", "Saved");
    await page.getByRole("button", { name: "Test the saved S3 connection" }).click();
    out.s3Ok = await waitText("#s3-result", "^(?!Testing)(.|\\n)+", 60000);
    out.secretShown = await page.getByLabel(/^Secret/).inputValue();
    // Replication's settings: the server's validation, field by field.
    await page.getByLabel(/^Sync interval/).fill("-1");
    await page.getByLabel(/^Replica directory/).fill("relative/dir");
    await save();
    out.replSync = await fieldError("backups.replication.syncInterval");
    out.replPath = await fieldError("backups.replication.path");
    await page.getByLabel(/^Sync interval/).fill("500");
    await page.getByLabel(/^Replica directory/).fill("");
    await save();
    await waitText("#settings-result", "Saved");
    await page.getByLabel("Store backups on S3").uncheck();
    await save();
    await waitText("#settings-result", "Saved");
    return out;
  },

  async catalog({ pin, keep, scope }) {
    await backupsView();
    await page.getByRole("button", { name: "Refresh", exact: true }).click();
    await page.locator("#prune").waitFor({ state: "visible" });
    const out = {};
    const pairs = () => page.locator("#stats-list").evaluate((dl) => Object.fromEntries(
      [...dl.querySelectorAll("dt")].map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
    out.stats = await pairs();
    out.creators = await page.locator("#backups-body tr").evaluateAll((rows) =>
      Object.fromEntries(rows.map((r) => [r.dataset.key, r.querySelector("td.creator").textContent])));
    await page.getByRole("button", { name: `Pin ${pin}`, exact: true }).click();
    await page.locator(`#backups-body tr[data-key="${pin}"] .badge.pinned`).waitFor();
    await page.getByRole("button", { name: `Delete ${pin}` }).click();
    await page.locator("#delete-dialog").getByRole("button", { name: "Delete", exact: true }).click();
    out.deletePinned = await waitText("#delete-error", ".");
    await page.getByRole("button", { name: "Cancel", exact: true }).click();
    await page.getByRole("button", { name: `Details of ${pin}` }).click();
    out.details = await page.locator("#info-list").evaluate((dl) => Object.fromEntries(
      [...dl.querySelectorAll("dt")].map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
    await page.locator("#info-dialog").getByRole("button", { name: "Close", exact: true }).click();
    await page.getByLabel("Keep the newest").fill(String(keep));
    await page.getByLabel("Of", { exact: true }).selectOption(scope);
    await page.getByRole("button", { name: "Preview", exact: true }).click();
    out.plan = await waitText('[data-testid="prune-plan"]', ".");
    out.planned = await page.locator("#prune-preview li").allTextContents();
    if (out.planned.length) {
      await page.getByRole("button", { name: `Delete ${out.planned.length} backups` }).click();
      out.pruned = await waitText("#prune-preview", "Deleted");
    }
    await page.getByRole("button", { name: `Unpin ${pin}`, exact: true }).click();
    await page.locator(`#backups-body tr[data-key="${pin}"] .badge.pinned`).waitFor({ state: "detached" });
    out.statsAfter = await pairs();
    return out;
  },

  async alerts({ webhook }) {
    await page.getByRole("link", { name: "Settings" }).click();
    await page.locator("#notify").waitFor({ state: "visible" });
    const save = () => page.getByRole("button", { name: "Save settings" }).click();
    const out = {};
    await page.getByLabel("Keep daily").fill("-1");
    await page.getByLabel("Webhook URL").fill("ftp://example.com/hook");
    await save();
    out.keepDaily = await waitText('[data-error="backups.retention.keepDaily"]', ".");
    out.webhookURL = await waitText('[data-error="backups.notify.webhookURL"]', ".");
    await page.getByLabel("Keep daily").fill("7");
    await page.getByLabel("Webhook URL").fill("");
    await save();
    await waitText("#settings-result", "Saved");
    await page.getByRole("button", { name: "Send a test alert" }).click();
    out.noWebhook = await waitText("#notify-result", "^(?!Sending)(.|\\n)+");
    await page.getByLabel("Webhook URL").fill(webhook);
    await save();
    await waitText("#settings-result", "Saved");
    await page.getByRole("button", { name: "Send a test alert" }).click();
    out.sent = await waitText("#notify-result", "^(?!Sending)(.|\\n)+");
    await page.getByLabel("Webhook URL").fill("");
    await save();
    await waitText("#settings-result", "Saved");
    return out;
  },

  async encryption({ recipient }) {
    await page.getByRole("link", { name: "Settings" }).click();
    await page.locator("#encryption").waitFor({ state: "visible" });
    const save = () => page.getByRole("button", { name: "Save settings" }).click();
    const field = page.getByLabel(/Public keys/);
    const out = {};
    await field.fill("age1notakey");
    await save();
    out.invalid = await waitText('[data-error="backups.encryption.recipients"]', ".");
    await field.fill(`\n  ${recipient}  \n`);
    await save();
    out.saved = await waitText("#settings-result", "Saved");
    out.shown = await field.inputValue();
    return out;
  },

  async encryptedPreview({ key, collection, identity }) {
    await backupsView();
    const out = { badge: await text(`#backups-body tr[data-key="${key}"] .badge.encrypted`) };
    await page.getByRole("button", { name: `Restore ${key}` }).click();
    await page.getByLabel("Only some collections (online, no restart)").check();
    await page.locator("#restore-collections").getByLabel(collection, { exact: true }).check();
    await page.getByRole("button", { name: "Preview (dry run)" }).click();
    out.withoutIdentity = await waitText("#restore-error", ".", 60000);
    await page.getByLabel(/^Identity/).fill(identity);
    await page.getByRole("button", { name: "Preview (dry run)" }).click();
    await page.locator('[data-testid="restore-summary"]').waitFor({ timeout: 60000 });
    out.result = await text("#restore-result");
    out.stored = await page.evaluate(() => JSON.stringify({ ...localStorage }) + JSON.stringify({ ...sessionStorage }) + location.href);
    await page.getByRole("button", { name: "Close", exact: true }).click();
    return out;
  },

  async moment({ at, before, after, collection }) {
    // at, before, after: moments as epoch milliseconds; the picker takes local time.
    await backupsView();
    const local = (ms) => page.evaluate((t) => {
      const d = new Date(t);
      const p = (n) => String(n).padStart(2, "0");
      return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
    }, ms);
    const posted = () => requests.filter((u) => u.endsWith("/api/backups/replication/restore")).length;
    const out = {};
    await page.waitForFunction(() => !document.getElementById("replication-restore").disabled);
    out.panel = await page.locator("#replication-list").evaluate((dl) => Object.fromEntries(
      [...dl.querySelectorAll("dt")].map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
    // The keyboard reaches the button; Enter opens the dialog with the picker focused.
    await page.getByRole("button", { name: "Restore a moment…" }).focus();
    await page.keyboard.press("Enter");
    const input = page.getByLabel(/^Moment to restore/);
    await input.waitFor({ state: "visible" });
    out.focused = await page.evaluate(() => document.activeElement?.id);
    out.title = await text("#restore-title");
    out.identityShown = await page.locator("#restore-identity").isVisible();
    out.limits = await input.evaluate((el) => ({ min: new Date(el.min).getTime(), max: new Date(el.max).getTime() }));
    const preview = page.getByRole("button", { name: "Preview (dry run)" });
    const postedBefore = posted();
    out.refused = [];
    for (const moment of [before, after]) {
      await input.fill(await local(moment));
      await preview.click();
      out.refused.push(await waitText("#restore-error", "."));
    }
    out.postedForRefused = posted() - postedBefore;
    await input.fill(await local(at));
    out.utc = await text("#restore-at-utc");
    await page.getByLabel("Only some collections (online, no restart)").check();
    await page.locator("#restore-collections").getByLabel(collection, { exact: true }).check();
    await page.getByLabel("Mode").selectOption("replace");
    await preview.click();
    const table = page.locator('[data-testid="restore-summary"]');
    await table.waitFor({ timeout: 60000 });
    const read = () => table.evaluate((t) => ({
      caption: t.caption.textContent,
      rows: [...t.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent)),
    }));
    out.preview = await read();
    out.previewResult = await waitText("#restore-result", ".");
    if (process.env.DASHBOARD_SHOTS) await page.screenshot({ path: path.join(process.env.DASHBOARD_SHOTS, "dashboard-moment-preview.png") });
    out.confirmWord = await text("#restore-confirm-key");
    const confirm = page.getByLabel(/Type .* to confirm/);
    await confirm.fill("not the moment");
    out.disabledWhenWrong = await page.locator("#restore-submit").isDisabled();
    await confirm.fill(out.confirmWord);
    await page.getByRole("button", { name: "Restore these collections" }).click();
    await waitText("#restore-result", "Restored", 60000);
    out.result = await text("#restore-result");
    out.error = await text("#restore-error");
    out.done = await read();
    await page.getByRole("button", { name: "Close", exact: true }).click();
    return out;
  },

  async failedRestore({ key }) {
    return scenarios.restore({ key });
  },

  async xss({ collection, hostileZip }) {
    await backupsView();
    await page.getByLabel("Upload a backup (.zip)").setInputFiles(hostileZip);
    await page.getByRole("button", { name: "Upload", exact: true }).click();
    const uploadError = await waitText("#upload-error", ".");
    await page.goto(`${base}/_/#/collections`);
    await page.reload();
    await page.locator(`details[data-collection="${collection}"]`).waitFor();
    await page.locator(`details[data-collection="${collection}"] summary`).click();
    const out = {
      uploadError,
      title: await text("#app-name"),
      records: await text(`details[data-collection="${collection}"]`),
    };
    await page.getByRole("link", { name: "Backups" }).click();
    await waitText("#job-last", ".");
    out.last = await text("#job-last");
    out.injected = await page.evaluate(() => ({
      flag: window.__xss === undefined ? null : String(window.__xss),
      images: document.querySelectorAll("img").length,
      bold: document.querySelectorAll("b.hostile").length,
    }));
    return out;
  },

  async report() {
    return { requests, problems, tokens };
  },
};

const rl = readline.createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  const { id, scenario, args } = JSON.parse(line);
  let answer;
  try {
    answer = { id, ok: true, result: await scenarios[scenario](args || {}) };
  } catch (error) {
    let shot = "";
    try {
      shot = path.join(os.tmpdir(), `dashboard-failure-${scenario}.png`);
      await page.screenshot({ path: shot, fullPage: true });
    } catch {
      shot = "";
    }
    answer = { id, ok: false, error: `${error.stack || error}\nscreenshot: ${shot}\npage problems: ${problems.join("\n")}` };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
await context.close();
fs.rmSync(profile, { recursive: true, force: true });
