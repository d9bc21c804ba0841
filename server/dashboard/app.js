// The dashboard: sign-in, backups, replication (point-in-time restore), settings and a read-only
// collections overview, over the public API.
// Every value from the API is put into the page as text (textContent, attributes), never as HTML.

import { ApiError, auth, describe, fieldErrors, request, upload } from "./api.js";

const $ = (id) => document.getElementById(id);
const NAME_RE = /^[a-z0-9_-]+\.zip$/;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const enc = encodeURIComponent;

/** An element: ``h("td", {class: "x", onclick: f}, "text", child)``; strings become text nodes. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = String(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function setText(id, text) {
  $(id).textContent = text == null ? "" : String(text);
}

// --- formatting ------------------------------------------------------------------------------

function parseDate(value) {
  if (typeof value !== "string" || !value) return null;
  const date = new Date(value.replace(" ", "T"));
  return Number.isNaN(date.getTime()) ? null : date;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function fmtDate(value) {
  const date = value instanceof Date ? value : parseDate(value);
  if (!date) return "—";
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function fmtAgo(value) {
  const date = value instanceof Date ? value : parseDate(value);
  if (!date) return "";
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  const future = seconds < 0;
  const s = Math.abs(seconds);
  const text = s < 60 ? `${s} s` : s < 3600 ? `${Math.round(s / 60)} min` : s < 86400 ? `${Math.round(s / 3600)} h`
    : `${Math.round(s / 86400)} d`;
  return future ? `in ${text}` : `${text} ago`;
}

/** A moment as the contract's datetime (UTC, to the millisecond). */
function wireDate(date) {
  return date.toISOString().replace("T", " ");
}

/** A moment as a ``datetime-local`` input's value (local time, to the second). */
function localInput(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/** This page's offset from UTC, e.g. "UTC+01:00". */
function localZone(date = new Date()) {
  const minutes = -date.getTimezoneOffset();
  const sign = minutes < 0 ? "−" : "+";
  return `UTC${sign}${pad(Math.floor(Math.abs(minutes) / 60))}:${pad(Math.abs(minutes) % 60)}`;
}

function fmtLag(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 60000)} min`;
}

function fmtSize(bytes) {
  if (typeof bytes !== "number" || !Number.isFinite(bytes)) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

// --- messages --------------------------------------------------------------------------------

function flash(text, kind = "ok") {
  const box = $("messages");
  const el = h("div", { class: `message ${kind === "error" ? "error" : ""}`, role: kind === "error" ? "alert" : "status" }, text);
  box.append(el);
  while (box.children.length > 4) box.firstElementChild.remove();
  setTimeout(() => el.remove(), 20000);
}

// --- session ---------------------------------------------------------------------------------

const session = { expiryTimer: 0, tickTimer: 0, lifetime: 0 };

function showSignIn(reason) {
  stopStatusPolling();
  clearTimeout(session.expiryTimer);
  clearInterval(session.tickTimer);
  $("nav").hidden = true;
  $("session").hidden = true;
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-signin";
  setText("signin-error", reason || "");
  $("signin-email").focus();
}

function renderSession() {
  const record = auth.record || {};
  setText("session-who", record.email || "");
  const at = auth.expiresAt();
  setText("session-expiry", at ? `session expires ${fmtDate(at)} (${fmtAgo(at)})` : "");
  $("session-expiry").title = at ? at.toISOString() : "";
}

function armSession() {
  clearTimeout(session.expiryTimer);
  clearInterval(session.tickTimer);
  const at = auth.expiresAt();
  if (!at) return;
  const left = at.getTime() - Date.now();
  session.lifetime = Math.max(session.lifetime, left);
  // Signed out at the expiry itself (setTimeout holds at most ~24.8 days).
  session.expiryTimer = setTimeout(() => {
    auth.clear();
    showSignIn("Your session has expired. Sign in again.");
  }, Math.min(left, 2 ** 31 - 1));
  session.tickTimer = setInterval(() => {
    renderSession();
    const remaining = (auth.expiresAt()?.getTime() || 0) - Date.now();
    // Refreshed once three quarters of its lifetime are gone, while the page is open.
    if (session.lifetime > 0 && remaining < session.lifetime / 4) refreshSession().catch(() => {});
  }, 30000);
  renderSession();
}

async function refreshSession() {
  const answer = await request("POST", "/api/collections/_superusers/auth-refresh");
  auth.save(answer.token, answer.record);
  session.lifetime = 0;
  armSession();
  return answer;
}

async function signIn(event) {
  event.preventDefault();
  setText("signin-error", "");
  const identity = $("signin-email").value.trim();
  const password = $("signin-password").value;
  if (!identity || !password) {
    setText("signin-error", "Enter the email and the password.");
    return;
  }
  try {
    const answer = await request("POST", "/api/collections/_superusers/auth-with-password",
      { body: { identity, password }, withAuth: false });
    auth.save(answer.token, answer.record);
    $("signin-password").value = "";
    await enter();
  } catch (error) {
    setText("signin-error", describe(error));
  }
}

function signOut() {
  auth.clear();
  showSignIn("");
  flash("Signed out.");
}

// --- views -----------------------------------------------------------------------------------

const state = {
  backups: [],
  info: new Map(), // key -> info (the catalog), when the server has it
  catalog: false, // the server has the catalog routes (status.stats present)
  status: null,
  replication: null, // GET /api/backups/replication's answer; null: not known (or no such route)
  replicationRoute: true, // false once the server answered 404: not polled again
  settings: null,
  statusTimer: 0,
  polling: false,
  following: 0, // restore/dry-run followers running: poll fast
};

function currentView() {
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1];
  return ["backups", "settings", "collections"].includes(name) ? name : "backups";
}

async function showView() {
  const name = currentView();
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    if (name === "backups") await loadBackups();
    else if (name === "settings") await loadSettings();
    else if (name === "collections") await loadCollections();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) flash(describe(error), "error");
  }
}

async function enter() {
  $("nav").hidden = false;
  $("session").hidden = false;
  armSession();
  startStatusPolling();
  await Promise.all([showView(), loadAppName()]);
}

async function loadAppName() {
  try {
    const settings = await request("GET", "/api/settings");
    state.settings = settings;
    const name = settings?.meta?.appName || "";
    setText("app-name", name ? `${name} · dashboard` : "Dashboard");
    document.title = name ? `${name} · dashboard` : "Dashboard";
  } catch {
    // the header keeps its default
  }
}

// --- job status ------------------------------------------------------------------------------

function startStatusPolling() {
  if (state.polling) return;
  state.polling = true;
  pollStatus();
}

function stopStatusPolling() {
  state.polling = false;
  clearTimeout(state.statusTimer);
}

async function pollStatus() {
  clearTimeout(state.statusTimer);
  if (!state.polling) return;
  try {
    const previous = state.status;
    const status = await request("GET", "/api/backups/status", { timeout: 10000 });
    applyStatus(status, previous);
  } catch (error) {
    if (error instanceof ApiError && error.status === 0) setText("job-active", "The server cannot be reached; retrying…");
  }
  await loadReplication();
  if (!state.polling) return;
  const busy = state.status?.active || state.following > 0;
  state.statusTimer = setTimeout(pollStatus, busy ? 500 : 4000);
}

function sameJob(a, b) {
  if (!a || !b) return a === b;
  return a.op === b.op && a.key === b.key && a.startedAt === b.startedAt && a.finishedAt === b.finishedAt;
}

function applyStatus(status, previous) {
  state.status = status;
  const hadCatalog = state.catalog;
  state.catalog = !!(status && status.stats);
  renderActive(status?.active || null, $("job-active"));
  renderLast(status?.last || null);
  renderStats(status);
  $("prune").hidden = !state.catalog;
  const finished = previous && ((previous.active && !status.active) || !sameJob(previous.last, status.last));
  if ((finished || hadCatalog !== state.catalog) && currentView() === "backups") loadBackups().catch(() => {});
}

const OPS = { create: "Creating", restore: "Restoring", upload: "Receiving" };

function renderActive(active, box) {
  box.replaceChildren();
  if (!active) {
    box.append(h("p", { class: "muted", "data-testid": "job-idle" }, "No job running."));
    return;
  }
  const total = Number(active.bytesTotal) || 0;
  const done = Number(active.bytesDone) || 0;
  const what = `${OPS[active.op] || active.op} ${active.key}`;
  const bar = h("progress", { max: total > 0 ? total : null, "aria-label": `${what} progress`, class: "job-progress" });
  if (total > 0) bar.value = Math.min(done, total);
  const detail = total > 0 ? `${fmtSize(done)} of ${fmtSize(total)} (${Math.floor((100 * Math.min(done, total)) / total)}%)`
    : "preparing…";
  box.append(h("p", {}, h("strong", {}, what), " — started ", fmtAgo(active.startedAt)),
    h("p", {}, bar, " ", h("span", { class: "job-detail" }, detail)));
}

function renderLast(last) {
  const box = $("job-last");
  box.replaceChildren();
  if (!last) {
    box.append(h("p", { class: "muted" }, "No job has run since the server started."));
    return;
  }
  const kind = last.dryRun ? `${last.op} (dry run)` : last.op;
  const outcome = last.ok ? h("span", { class: "ok" }, "succeeded") : h("span", { class: "fail" }, "failed");
  box.append(h("p", { "data-testid": "job-last" }, "Last job: ", h("strong", {}, kind), " ", last.key || "", " ", outcome,
    " at ", fmtDate(last.finishedAt), ` (${fmtAgo(last.finishedAt)})`));
  if (!last.ok && last.error) box.append(h("p", { class: "error", "data-testid": "job-last-error" }, last.error));
}

function renderStats(status) {
  const list = $("stats-list");
  list.replaceChildren();
  const add = (term, value, attrs = {}) => list.append(h("dt", {}, term), h("dd", attrs, value));
  const storage = status?.storage || {};
  add("Storage", storage.kind === "s3" ? "S3" : storage.kind === "local" ? "local disk" : storage.kind || "—");
  if (typeof storage.writable === "boolean") add("Writable", storage.writable ? "yes" : "no", storage.writable ? {} : { class: "fail" });
  if (typeof storage.freeBytes === "number") add("Free space", fmtSize(storage.freeBytes));
  const stats = status?.stats;
  if (!stats) return;
  add("Backups", String(stats.count ?? "—"));
  add("Total size", fmtSize(stats.totalSize));
  // oldest/newest: {key, modified}; lastSuccess: {op, key, finishedAt} (plain datetimes accepted too).
  const when = (value, field) => {
    if (!value) return "—";
    if (typeof value === "string") return `${fmtDate(value)} (${fmtAgo(value)})`;
    const at = value[field];
    return `${value.op ? `${value.op} ` : ""}${value.key || ""} — ${fmtDate(at)} (${fmtAgo(at)})`;
  };
  add("Oldest", when(stats.oldest, "modified"));
  add("Newest", when(stats.newest, "modified"));
  add("Last success", when(stats.lastSuccess, "finishedAt"));
  add("Next scheduled", stats.nextScheduled ? when(stats.nextScheduled) : "none");
  if (stats.stale) add("Alert", "No recent successful backup.", { class: "fail", "data-testid": "stale" });
}

// --- replication (point-in-time restore) -------------------------------------------------------

async function loadReplication() {
  if (!state.replicationRoute || !state.polling) return state.replication;
  try {
    applyReplication(await request("GET", "/api/backups/replication", { timeout: 10000 }));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      state.replicationRoute = false;
      applyReplication(null);
    }
    // otherwise (a restart, a timeout): the last answer stays shown until the next poll
  }
  return state.replication;
}

/** The restorable window as whole seconds (what the time picker can hold), or null. */
function replicaWindow(r = state.replication) {
  if (!r || !r.enabled || !r.window) return null;
  const from = parseDate(r.window.from);
  const to = parseDate(r.window.to);
  if (!from || !to) return null;
  const first = new Date(Math.ceil(from.getTime() / 1000) * 1000);
  const last = new Date(Math.floor(to.getTime() / 1000) * 1000);
  return first.getTime() <= last.getTime() ? { from: first, to: last } : null;
}

function applyReplication(r) {
  state.replication = r;
  const panel = $("replication");
  panel.hidden = !r;
  if (!r) return;
  const list = $("replication-list");
  list.replaceChildren();
  const add = (term, value, attrs = {}) => list.append(h("dt", {}, term), h("dd", attrs, value));
  const win = replicaWindow(r);
  add("Enabled", r.enabled ? "yes" : "no (Settings → Continuous replication turns it on)", { "data-testid": "replication-enabled" });
  if (r.enabled) {
    add("Lag", fmtLag(r.lagMs));
    add("Restorable window", win ? `${fmtDate(win.from)} → ${fmtDate(win.to)} (${localZone()})` : "nothing restorable yet",
      { "data-testid": "replication-window", title: r.window ? `${r.window.from || ""} → ${r.window.to || ""}` : "" });
    add("Shipped", fmtSize(r.bytes));
  }
  const error = r.lastError;
  add("Last error", error ? (typeof error === "string" ? error : JSON.stringify(error)) : "none",
    error ? { class: "fail", "data-testid": "replication-error" } : { "data-testid": "replication-error" });
  $("replication-restore").disabled = !win;
  if (restore.source === "replica" && $("restore-dialog").open) updateMomentLimits();
}

/** Poll the status until ``done(status)`` returns a value; through a restart, ``/api/health`` is
 *  awaited first. ``onActive`` sees each running job. */
async function follow(done, onActive, onWaiting) {
  state.following += 1;
  try {
    const deadline = Date.now() + 60 * 60 * 1000;
    while (Date.now() < deadline) {
      let status = null;
      try {
        status = await request("GET", "/api/backups/status", { timeout: 5000 });
      } catch (error) {
        if (error instanceof ApiError && error.status !== 0 && error.status < 500) throw error;
        onWaiting();
        await waitHealthy();
        continue;
      }
      applyStatus(status, state.status);
      const result = done(status);
      if (result) return result;
      if (status.active) onActive(status.active);
      else {
        // Between the job's end and its outcome the server may be restarting: wait for it.
        await waitHealthy();
      }
      await sleep(300);
    }
    throw new Error("No outcome was seen within an hour.");
  } finally {
    state.following -= 1;
  }
}

async function waitHealthy() {
  for (;;) {
    try {
      await request("GET", "/api/health", { timeout: 3000, withAuth: false });
      return;
    } catch {
      await sleep(300);
    }
  }
}

// --- backups ---------------------------------------------------------------------------------

const CREATORS = { superuser: "manual", scheduler: "scheduled", cli: "command line", upload: "upload",
  "pre-restore": "pre-restore" };

/** Who or what made a backup: the catalog's ``createdBy``, else what its name tells. */
function creatorOf(key, info) {
  const by = info?.createdBy;
  if (by && by.kind) {
    const label = CREATORS[by.kind] || String(by.kind);
    return by.email ? `${label} (${by.email})` : label;
  }
  if (key.startsWith("@auto_pb_backup_")) return "scheduled";
  if (key.startsWith("@pre_restore_")) return "pre-restore";
  return "—";
}

async function loadBackups() {
  const list = await request("GET", "/api/backups");
  list.sort((a, b) => (b.modified || "").localeCompare(a.modified || "") || a.key.localeCompare(b.key));
  state.backups = list;
  if (state.catalog) {
    await Promise.all(list.map(async (item) => {
      try {
        state.info.set(item.key, await request("GET", `/api/backups/${enc(item.key)}/info`));
      } catch {
        state.info.delete(item.key);
      }
    }));
  }
  renderBackups();
}

function renderBackups() {
  const body = $("backups-body");
  body.replaceChildren();
  $("backups-empty").hidden = state.backups.length > 0;
  for (const item of state.backups) {
    const info = state.info.get(item.key);
    const badges = [];
    if (info?.pinned) badges.push(h("span", { class: "badge pinned" }, "pinned"));
    if (info?.encrypted) badges.push(h("span", { class: "badge encrypted" }, "encrypted"));
    const date = info?.createdAt || item.modified;
    const actions = [
      h("button", { type: "button", onclick: () => download(item.key), "aria-label": `Download ${item.key}` }, "Download"),
      h("button", { type: "button", onclick: () => openRestore(item.key), "aria-label": `Restore ${item.key}` }, "Restore…"),
      h("button", { type: "button", onclick: () => openDelete(item.key), "aria-label": `Delete ${item.key}` }, "Delete…"),
    ];
    if (state.catalog && info) {
      actions.push(h("button", { type: "button", onclick: () => togglePin(item.key, !info.pinned),
        "aria-label": `${info.pinned ? "Unpin" : "Pin"} ${item.key}` }, info.pinned ? "Unpin" : "Pin"));
      actions.push(h("button", { type: "button", onclick: () => openInfo(item.key), "aria-label": `Details of ${item.key}` }, "Details"));
    }
    body.append(h("tr", { "data-key": item.key },
      h("td", { class: "key" }, item.key, badges),
      h("td", { class: "date", title: date || "" }, fmtDate(date), h("br"), h("span", { class: "muted" }, fmtAgo(date))),
      h("td", { class: "size" }, fmtSize(item.size)),
      h("td", { class: "creator" }, creatorOf(item.key, info)),
      h("td", { class: "actions" }, actions)));
  }
}

async function createBackup(event) {
  event.preventDefault();
  setText("create-error", "");
  const name = $("create-name").value.trim();
  if (name && (name.length > 150 || !NAME_RE.test(name))) {
    setText("create-error", "The name must be 1 to 150 characters of a-z, 0-9, _ and -, ending in .zip (e.g. my_backup.zip).");
    return;
  }
  try {
    await request("POST", "/api/backups", { body: name ? { name } : {} });
    $("create-name").value = "";
    flash(name ? `Backup ${name} started.` : "Backup started.");
    await pollStatus();
  } catch (error) {
    setText("create-error", describe(error));
  }
}

async function uploadBackup(event) {
  event.preventDefault();
  setText("upload-error", "");
  setText("upload-text", "");
  const file = $("upload-file").files[0];
  if (!file) {
    setText("upload-error", "Choose a .zip file first.");
    return;
  }
  if (file.name.length > 150 || !NAME_RE.test(file.name)) {
    setText("upload-error", "The file's name must be 1 to 150 characters of a-z, 0-9, _ and -, ending in .zip: rename it first.");
    return;
  }
  const bar = $("upload-progress");
  bar.hidden = false;
  bar.value = 0;
  const button = event.submitter || $("upload-form").querySelector("button");
  button.disabled = true;
  try {
    await upload("/api/backups/upload", file, (loaded, total) => {
      bar.max = total;
      bar.value = loaded;
      setText("upload-text", loaded < total ? `${fmtSize(loaded)} of ${fmtSize(total)} (${Math.floor((100 * loaded) / total)}%)`
        : "Sent; the server is checking the backup…");
    });
    bar.value = bar.max;
    setText("upload-text", `Uploaded ${file.name}.`);
    $("upload-file").value = "";
    await loadBackups();
  } catch (error) {
    setText("upload-text", "");
    setText("upload-error", describe(error));
  } finally {
    button.disabled = false;
  }
}

async function download(key) {
  try {
    // The only credential in a URL: a short-lived file token, never the auth token.
    const { token } = await request("POST", "/api/files/token");
    const link = h("a", { href: `/api/backups/${enc(key)}?token=${enc(token)}`, download: key, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
  } catch (error) {
    flash(describe(error), "error");
  }
}

let deleteKey = "";

function openDelete(key) {
  deleteKey = key;
  setText("delete-key", key);
  setText("delete-error", "");
  $("delete-dialog").showModal();
  $("delete-cancel").focus();
}

async function confirmDelete() {
  try {
    await request("DELETE", `/api/backups/${enc(deleteKey)}`);
    $("delete-dialog").close();
    flash(`Deleted ${deleteKey}.`);
    await loadBackups();
  } catch (error) {
    setText("delete-error", describe(error));
  }
}

async function togglePin(key, pin) {
  try {
    await request(pin ? "POST" : "DELETE", `/api/backups/${enc(key)}/pin`);
    flash(`${pin ? "Pinned" : "Unpinned"} ${key}.`);
    await loadBackups();
  } catch (error) {
    flash(describe(error), "error");
  }
}

function openInfo(key) {
  const info = state.info.get(key);
  const list = $("info-list");
  list.replaceChildren();
  setText("info-title", `Backup ${key}`);
  const add = (term, value) => list.append(h("dt", {}, term), h("dd", {}, value));
  if (!info) add("Details", "not available");
  else {
    add("Created", fmtDate(info.createdAt));
    add("Made by", creatorOf(key, info));
    add("Size", fmtSize(info.size));
    add("App", info.appName ?? "—");
    add("Server version", info.serverVersion ?? "—");
    add("Format", info.format === "manifest" ? "with manifest (checksums)" : info.format ?? "—");
    add("Encrypted", info.encrypted ? "yes" : "no");
    add("Pinned", info.pinned ? "yes" : "no");
    for (const [name, bytes] of Object.entries(info.databases || {})) add(name, fmtSize(bytes));
    if (info.files) add("Files", `${info.files.count} (${fmtSize(info.files.bytes)})`);
    if (info.collections) {
      add("Collections", h("ul", {}, Object.entries(info.collections).map(([name, c]) =>
        h("li", {}, `${name}: ${c.records} records, ${c.files} files`))));
    }
  }
  $("info-dialog").showModal();
}

// --- prune (the catalog) ---------------------------------------------------------------------

async function previewPrune(event) {
  event.preventDefault();
  setText("prune-error", "");
  const box = $("prune-preview");
  box.replaceChildren();
  const keep = Number.parseInt($("prune-keep").value, 10);
  const scope = $("prune-scope").value;
  if (!Number.isInteger(keep) || keep < 0) {
    setText("prune-error", "Keep must be a whole number, 0 or more.");
    return;
  }
  try {
    const plan = await request("POST", "/api/backups/prune", { body: { keep, scope, dryRun: true } });
    const deleted = plan.deleted || [];
    box.append(h("p", { "data-testid": "prune-plan" }, deleted.length
      ? `Would delete ${deleted.length} of ${plan.before} backups, freeing ${fmtSize(plan.freedBytes)} (pinned and busy backups are never deleted):`
      : `Nothing to delete: ${plan.before} backups, all kept.`));
    if (deleted.length) {
      box.append(h("ul", {}, deleted.map((key) => h("li", {}, key))));
      box.append(h("button", { type: "button", class: "danger", onclick: () => runPrune(keep, scope) }, `Delete ${deleted.length} backups`));
    }
  } catch (error) {
    setText("prune-error", describe(error));
  }
}

async function runPrune(keep, scope) {
  try {
    const done = await request("POST", "/api/backups/prune", { body: { keep, scope, dryRun: false } });
    $("prune-preview").replaceChildren(h("p", { role: "status" },
      `Deleted ${done.deleted.length} backups, freed ${fmtSize(done.freedBytes)}.`));
    await loadBackups();
  } catch (error) {
    setText("prune-error", describe(error));
  }
}

// --- restore ---------------------------------------------------------------------------------

// One dialog for both sources: a backup (``key``) or a moment of the replica (``source: "replica"``).
const restore = { source: "backup", key: "", confirmWord: "", running: false };

const MODE_WORDS = {
  backup: ["merge: write the backup's records back by id, keep newer ones", "replace: the collections exactly as in the backup"],
  replica: ["merge: write that moment's records back by id, keep newer ones", "replace: the collections exactly as at that moment"],
};

function resetRestoreDialog(title) {
  setText("restore-title", title);
  const words = MODE_WORDS[restore.source];
  for (const [i, option] of [...$("restore-mode").options].entries()) option.textContent = words[i];
  setText("restore-result", "");
  setText("restore-error", "");
  $("restore-summary").replaceChildren();
  $("restore-progress").replaceChildren();
  $("restore-confirm").value = "";
  $("restore-identity").value = "";
  $("restore-submit").disabled = true;
  $("restore-badges").replaceChildren();
  document.querySelector('input[name="restore-kind"][value="full"]').checked = true;
  $("restore-partial").hidden = true;
  $("restore-collections").replaceChildren(h("p", { class: "muted" }, "Loading…"));
}

async function openRestore(key) {
  restore.source = "backup";
  restore.key = key;
  restore.confirmWord = key;
  const info = state.info.get(key);
  resetRestoreDialog(`Restore ${key}`);
  setText("restore-confirm-key", key);
  $("restore-moment").hidden = true;
  $("restore-identity-box").hidden = false;
  $("restore-badges").replaceChildren(
    info?.encrypted ? h("span", { class: "badge encrypted" }, "encrypted: the identity is needed") : "",
    info?.pinned ? h("span", { class: "badge pinned" }, "pinned") : "");
  $("restore-dialog").showModal();
  $("restore-confirm").focus();
  // The backup's collections (the catalog) or, without it, the current ones.
  await fillRestoreCollections(info?.collections ? Object.keys(info.collections) : null);
}

/** "Restore a moment…": the same dialog with a time picker limited to the replica's window. */
async function openReplicaRestore() {
  restore.source = "replica";
  restore.key = "";
  resetRestoreDialog("Restore a moment");
  $("restore-moment").hidden = false;
  // The identity is asked for when the settings encrypt (the replica's files then are); an
  // answer saying one is needed shows it too.
  const recipients = state.settings?.backups?.encryption?.recipients;
  $("restore-identity-box").hidden = !(Array.isArray(recipients) && recipients.length);
  if (!$("restore-identity-box").hidden) {
    $("restore-badges").append(h("span", { class: "badge encrypted" }, "encrypted: the identity is needed"));
  }
  const win = replicaWindow();
  $("restore-at").value = win ? localInput(win.to) : "";
  updateMomentLimits();
  onMomentInput();
  $("restore-dialog").showModal();
  $("restore-at").focus();
  await fillRestoreCollections(null); // the current collections
}

/** The picker's bounds and the window's words, from the last replication status. */
function updateMomentLimits() {
  const win = replicaWindow();
  const input = $("restore-at");
  if (win) {
    input.min = localInput(win.from);
    input.max = localInput(win.to);
    setText("restore-window", `Restorable: from ${fmtDate(win.from)} to ${fmtDate(win.to)} (your local time, ${localZone()}).`);
  } else {
    input.removeAttribute("min");
    input.removeAttribute("max");
    setText("restore-window", "Nothing can be restored yet: the replica has no restorable moment.");
  }
}

/** The picked moment as a Date, or null. */
function pickedMoment() {
  const value = $("restore-at").value;
  if (!value) return null;
  const date = new Date(value); // a datetime-local value, without an offset: local time
  return Number.isNaN(date.getTime()) ? null : date;
}

function onMomentInput() {
  const at = pickedMoment();
  setText("restore-at-utc", at ? `That is ${wireDate(at).slice(0, 19)} UTC.` : "");
  restore.confirmWord = at ? fmtDate(at) : "";
  setText("restore-confirm-key", restore.confirmWord || "the moment (choose it first)");
  updateRestoreButton();
}

/** ``{at}`` when the picked moment can be restored, else ``{error}`` in words. */
function checkMoment() {
  const at = pickedMoment();
  if (!at) return { error: "Choose the moment to restore (date and time)." };
  const win = replicaWindow();
  if (!win) return { error: "Nothing can be restored yet: the replica has no restorable moment (is replication enabled?)." };
  if (at.getTime() < win.from.getTime() || at.getTime() > win.to.getTime()) {
    return { error: `${fmtDate(at)} is outside the restorable window: choose a moment from ${fmtDate(win.from)} to ${fmtDate(win.to)} (your local time).` };
  }
  return { at };
}

async function fillRestoreCollections(names) {
  const box = $("restore-collections");
  if (!names) {
    try {
      const answer = await request("GET", "/api/collections?perPage=500&sort=name");
      names = (answer.items || []).map((c) => c.name);
    } catch (error) {
      names = [];
      setText("restore-error", describe(error));
    }
  }
  names = names.filter((name) => !name.startsWith("_") || name === "_superusers").sort();
  box.replaceChildren(...names.map((name) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "restore-collection", value: name, onchange: updateRestoreButton }), name)));
  if (!names.length) box.append(h("p", { class: "muted" }, "No collections."));
}

function restoreBody(dryRun, at) {
  const body = at ? { at: wireDate(at) } : {};
  if (document.querySelector('input[name="restore-kind"]:checked').value === "partial") {
    body.collections = [...document.querySelectorAll('input[name="restore-collection"]:checked')].map((el) => el.value);
    body.mode = $("restore-mode").value;
  }
  if (dryRun) body.dryRun = true;
  const identity = $("restore-identity").value;
  if (identity) body.identity = identity; // kept in this page only, sent to this server only
  return body;
}

function updateRestoreButton() {
  const partial = document.querySelector('input[name="restore-kind"]:checked').value === "partial";
  $("restore-partial").hidden = !partial;
  const picked = document.querySelectorAll('input[name="restore-collection"]:checked').length;
  $("restore-submit").disabled = restore.running || !restore.confirmWord || $("restore-confirm").value !== restore.confirmWord
    || (partial && !picked);
  $("restore-preview").disabled = restore.running || (partial && !picked);
  $("restore-submit").textContent = partial ? "Restore these collections" : "Restore everything";
}

function renderSummary(summary) {
  const box = $("restore-summary");
  box.replaceChildren();
  if (!summary || !summary.collections) return;
  const rows = Object.entries(summary.collections).map(([name, c]) => h("tr", {},
    h("th", { scope: "row" }, name), h("td", {}, String(c.inserted ?? 0)), h("td", {}, String(c.updated ?? 0)),
    h("td", {}, String(c.deleted ?? 0)), h("td", {}, String(c.unchanged ?? 0)),
    h("td", {}, `+${c.files?.added ?? 0} ~${c.files?.replaced ?? 0} −${c.files?.removed ?? 0}`)));
  box.append(h("table", { "data-testid": "restore-summary" },
    h("caption", {}, summary.dryRun ? "Dry run: what the restore would change" : "What the restore changed"),
    h("thead", {}, h("tr", {}, ["Collection", "Inserted", "Updated", "Deleted", "Unchanged", "Files (+ added ~ replaced − removed)"]
      .map((title) => h("th", { scope: "col" }, title)))),
    h("tbody", {}, rows)));
}

async function runRestore(dryRun) {
  if (restore.running) return;
  setText("restore-result", "");
  setText("restore-error", "");
  const replica = restore.source === "replica";
  const key = restore.key;
  let at = null;
  if (replica) {
    await loadReplication(); // the window as it is now (its end moves with the writes)
    const checked = checkMoment();
    if (checked.error) {
      setText("restore-error", checked.error);
      $("restore-at").focus();
      return;
    }
    at = checked.at;
  }
  const body = restoreBody(dryRun, at);
  const full = !body.collections;
  const moment = at ? fmtDate(at) : "";
  const done = full ? (replica ? `Restored everything as it was at ${moment}.` : `Restored ${key}.`)
    : (replica ? `Restored the collections as they were at ${moment}.` : `Restored the collections from ${key}.`);
  const path = replica ? "/api/backups/replication/restore" : `/api/backups/${enc(key)}/restore`;
  restore.running = true;
  updateRestoreButton();
  const progress = $("restore-progress");
  try {
    const before = (await request("GET", "/api/backups/status")).last;
    await request("POST", path, Object.keys(body).length ? { body } : {});
    progress.replaceChildren(h("p", {}, dryRun ? "Dry run started…" : "Restore started…"));
    let restarting = false;
    const last = await follow(
      (status) => {
        const l = status.last;
        const ours = l && (replica ? String(l.key || "").startsWith("replica@") : l.key === key);
        const mine = !status.active && ours && l.op === "restore" && !sameJob(l, before);
        return mine ? l : null;
      },
      (active) => {
        renderActive(active, progress);
        if (full && !dryRun && active.bytesTotal > 0 && active.bytesDone >= active.bytesTotal) {
          progress.append(h("p", {}, "Verified; swapping the data in and restarting the server…"));
        }
      },
      () => {
        if (!restarting) progress.replaceChildren(h("p", {}, "The server is restarting on the restored data; waiting for it…"));
        restarting = true;
      });
    progress.replaceChildren();
    renderSummary(last.summary);
    if (last.ok) {
      const what = dryRun ? "Dry run finished: nothing was changed." : done;
      setText("restore-result", last.verified ? `${what} (verified: ${last.verified})` : what);
      $("restore-result").className = "ok";
      if (!dryRun) flash(done);
      if (!dryRun && full) await loadAppName();
    } else {
      setText("restore-error", `${dryRun ? "Dry run" : "Restore"} failed: ${last.error || "no reason given"}`);
      if (/identity is required/.test(String(last.error || ""))) $("restore-identity-box").hidden = false;
    }
    await loadBackups();
  } catch (error) {
    progress.replaceChildren();
    if (error instanceof ApiError && error.status === 401) {
      setText("restore-error", "The server no longer accepts this session (the restored data has its own superusers): sign in again; the outcome is shown under Jobs.");
    } else setText("restore-error", describe(error));
  } finally {
    restore.running = false;
    updateRestoreButton();
  }
}

// --- settings --------------------------------------------------------------------------------

const PRESETS = ["", "0 * * * *", "0 */6 * * *", "0 0 * * *", "0 0 * * 0", "0 0 1 * *"];

function syncPreset() {
  const cron = $("set-cron").value.trim();
  $("set-cron-preset").value = PRESETS.includes(cron) ? cron : "custom";
}

async function loadSettings() {
  const settings = await request("GET", "/api/settings");
  state.settings = settings;
  const b = settings.backups || {};
  clearSettingsErrors();
  $("set-cron").value = b.cron || "";
  syncPreset();
  $("set-maxkeep").value = b.cronMaxKeep ?? 0;
  $("set-prerestore").value = b.preRestoreMaxKeep ?? 0;
  const s3 = b.s3 || {};
  $("set-s3-enabled").checked = !!s3.enabled;
  $("set-s3-bucket").value = s3.bucket || "";
  $("set-s3-region").value = s3.region || "";
  $("set-s3-endpoint").value = s3.endpoint || "";
  $("set-s3-access").value = s3.accessKey || "";
  $("set-s3-secret").value = "";
  $("set-s3-pathstyle").checked = !!s3.forcePathStyle;
  $("retention").hidden = !b.retention;
  if (b.retention) {
    $("set-keep-last").value = b.retention.keepLast ?? 0;
    $("set-keep-daily").value = b.retention.keepDaily ?? 0;
    $("set-keep-weekly").value = b.retention.keepWeekly ?? 0;
    $("set-keep-monthly").value = b.retention.keepMonthly ?? 0;
  }
  $("encryption").hidden = !b.encryption;
  if (b.encryption) $("set-recipients").value = (b.encryption.recipients || []).join("\n");
  $("replication-settings").hidden = !b.replication;
  if (b.replication) {
    $("set-repl-enabled").checked = !!b.replication.enabled;
    $("set-repl-path").value = b.replication.path || "";
    $("set-repl-sync").value = b.replication.syncInterval ?? 1000;
    $("set-repl-retention").value = b.replication.retention ?? 72;
    $("set-repl-snapshot").value = b.replication.snapshotInterval ?? 24;
  }
  $("notify").hidden = !b.notify;
  if (b.notify) {
    $("set-webhook").value = b.notify.webhookURL || "";
    $("set-onfailure").checked = !!b.notify.onFailure;
    $("set-stale").value = b.notify.staleAfterHours ?? 0;
  }
}

function clearSettingsErrors() {
  for (const el of document.querySelectorAll("#settings-form [data-error]")) el.textContent = "";
  setText("settings-error", "");
  setText("settings-result", "");
}

function number(id, errors, path) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  if (raw === "" || !Number.isInteger(value)) {
    errors[path] = "Must be a whole number.";
    return raw;
  }
  return value;
}

async function saveSettings(event) {
  event.preventDefault();
  clearSettingsErrors();
  const errors = {};
  const backups = {
    cron: $("set-cron").value.trim(),
    cronMaxKeep: number("set-maxkeep", errors, "backups.cronMaxKeep"),
    preRestoreMaxKeep: number("set-prerestore", errors, "backups.preRestoreMaxKeep"),
    s3: {
      enabled: $("set-s3-enabled").checked, bucket: $("set-s3-bucket").value.trim(), region: $("set-s3-region").value.trim(),
      endpoint: $("set-s3-endpoint").value.trim(), accessKey: $("set-s3-access").value.trim(),
      forcePathStyle: $("set-s3-pathstyle").checked,
    },
  };
  const secret = $("set-s3-secret").value;
  if (secret) backups.s3.secret = secret;
  if (!$("retention").hidden) {
    backups.retention = {
      keepLast: number("set-keep-last", errors, "backups.retention.keepLast"),
      keepDaily: number("set-keep-daily", errors, "backups.retention.keepDaily"),
      keepWeekly: number("set-keep-weekly", errors, "backups.retention.keepWeekly"),
      keepMonthly: number("set-keep-monthly", errors, "backups.retention.keepMonthly"),
    };
  }
  if (!$("encryption").hidden) {
    const recipients = $("set-recipients").value.split("\n").map((line) => line.trim()).filter(Boolean);
    backups.encryption = { recipients };
  }
  if (!$("replication-settings").hidden) {
    backups.replication = {
      enabled: $("set-repl-enabled").checked, path: $("set-repl-path").value.trim(),
      syncInterval: number("set-repl-sync", errors, "backups.replication.syncInterval"),
      retention: number("set-repl-retention", errors, "backups.replication.retention"),
      snapshotInterval: number("set-repl-snapshot", errors, "backups.replication.snapshotInterval"),
    };
  }
  if (!$("notify").hidden) {
    backups.notify = {
      webhookURL: $("set-webhook").value.trim(), onFailure: $("set-onfailure").checked,
      staleAfterHours: number("set-stale", errors, "backups.notify.staleAfterHours"),
    };
  }
  if (Object.keys(errors).length) {
    showSettingsErrors(errors);
    setText("settings-error", "Fix the fields marked.");
    return;
  }
  try {
    state.settings = await request("PATCH", "/api/settings", { body: { backups } });
    await loadSettings();
    setText("settings-result", "Saved.");
    pollStatus();
  } catch (error) {
    const fields = fieldErrors(error.data);
    const unplaced = showSettingsErrors(fields);
    setText("settings-error", [error.message, ...unplaced].join("\n"));
  }
}

function showSettingsErrors(fields) {
  const unplaced = [];
  for (const [path, message] of Object.entries(fields)) {
    const el = document.querySelector(`#settings-form [data-error="${CSS.escape(path)}"]`);
    if (el) el.textContent = message;
    else unplaced.push(`${path}: ${message}`);
  }
  return unplaced;
}

async function testS3() {
  setText("s3-result", "Testing…");
  $("s3-result").className = "";
  try {
    await request("POST", "/api/settings/test/s3", { body: { filesystem: "backups" } });
    setText("s3-result", "Connection OK.");
    $("s3-result").className = "ok";
  } catch (error) {
    setText("s3-result", describe(error));
    $("s3-result").className = "fail";
  }
}

async function testNotify() {
  setText("notify-result", "Sending…");
  $("notify-result").className = "";
  try {
    await request("POST", "/api/backups/notify/test");
    setText("notify-result", "Test alert delivered.");
    $("notify-result").className = "ok";
  } catch (error) {
    setText("notify-result", describe(error));
    $("notify-result").className = "fail";
  }
}

// --- collections overview --------------------------------------------------------------------

function cell(value) {
  if (value === null || value === undefined) return "";
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 80 ? `${text.slice(0, 79)}…` : text;
}

async function loadCollections() {
  const box = $("collections-list");
  const answer = await request("GET", "/api/collections?perPage=500&sort=name");
  const collections = answer.items || [];
  const rows = await Promise.all(collections.map(async (c) => {
    const fields = (c.fields || []).map((f) => f.name);
    try {
      const sort = fields.includes("created") ? "&sort=-created" : "";
      const page = await request("GET", `/api/collections/${enc(c.name)}/records?perPage=5${sort}`);
      return { c, fields, page };
    } catch (error) {
      return { c, fields, error };
    }
  }));
  box.replaceChildren(...rows.map(({ c, fields, page, error }) => {
    const count = page ? `${page.totalItems} records` : "";
    const shown = ["id", ...fields.filter((f) => !["id", "password", "tokenKey"].includes(f))].slice(0, 6);
    const content = error ? h("p", { class: "error" }, describe(error))
      : page.items.length === 0 ? h("p", { class: "muted" }, "No records.")
        : h("table", {}, h("caption", { class: "sr-only" }, `Newest records of ${c.name}`),
          h("thead", {}, h("tr", {}, shown.map((f) => h("th", { scope: "col" }, f)))),
          h("tbody", {}, page.items.map((r) => h("tr", {}, shown.map((f) => h("td", {}, cell(r[f])))))));
    return h("details", { "data-collection": c.name },
      h("summary", {}, h("strong", {}, c.name), ` (${c.type}) — ${count}`), content);
  }));
}

// --- wiring ----------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("refresh-session").addEventListener("click", () => refreshSession()
    .then(() => flash("Session refreshed.")).catch((error) => flash(describe(error), "error")));
  $("backups-refresh").addEventListener("click", () => Promise.all([loadBackups(), pollStatus()])
    .catch((error) => flash(describe(error), "error")));
  $("collections-refresh").addEventListener("click", () => loadCollections().catch((error) => flash(describe(error), "error")));
  $("create-form").addEventListener("submit", createBackup);
  $("upload-form").addEventListener("submit", uploadBackup);
  $("delete-cancel").addEventListener("click", () => $("delete-dialog").close());
  $("delete-confirm").addEventListener("click", confirmDelete);
  $("prune-form").addEventListener("submit", previewPrune);
  $("restore-confirm").addEventListener("input", updateRestoreButton);
  $("restore-at").addEventListener("input", onMomentInput);
  $("restore-at").addEventListener("change", onMomentInput);
  $("replication-restore").addEventListener("click", () => openReplicaRestore().catch((error) => flash(describe(error), "error")));
  for (const el of document.querySelectorAll('input[name="restore-kind"]')) el.addEventListener("change", updateRestoreButton);
  $("restore-preview").addEventListener("click", () => runRestore(true));
  $("restore-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!$("restore-submit").disabled) runRestore(false);
  });
  $("restore-close").addEventListener("click", () => $("restore-dialog").close());
  $("restore-dialog").addEventListener("close", () => {
    $("restore-identity").value = ""; // the identity lives only while the dialog is open
  });
  $("settings-form").addEventListener("submit", saveSettings);
  $("set-cron-preset").addEventListener("change", () => {
    const value = $("set-cron-preset").value;
    if (value !== "custom") $("set-cron").value = value;
    else $("set-cron").focus();
  });
  $("set-cron").addEventListener("input", syncPreset);
  $("s3-test").addEventListener("click", testS3);
  $("notify-test").addEventListener("click", testNotify);
  window.addEventListener("hashchange", () => {
    if (auth.token) showView();
  });
  auth.onUnauthorized((reason) => showSignIn(`Your session is no longer valid (${reason}) Sign in again.`));
}

async function start() {
  wire();
  auth.load();
  if (!auth.token) return showSignIn("");
  if (auth.isExpired()) {
    auth.clear();
    return showSignIn("Your session has expired. Sign in again.");
  }
  try {
    await refreshSession(); // as PocketBase's dashboard: the saved token is checked and renewed on load
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showSignIn(describe(error));
    return;
  }
  await enter();
}

start();
