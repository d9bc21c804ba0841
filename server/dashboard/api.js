// The dashboard's client of the public HTTP API: the auth token (kept as the JS SDK keeps it),
// JSON requests with the contract's errors, and uploads with progress.

const STORE_KEY = "pocketbase_auth"; // the SDK's LocalAuthStore key and shape: {token, record}

export class ApiError extends Error {
  constructor(status, message, data) {
    super(message || "Something went wrong.");
    this.status = status; // 0: the server could not be reached
    this.data = data && typeof data === "object" ? data : {};
  }
}

function decodePayload(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const text = decodeURIComponent(Array.from(atob(part), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""));
    const payload = JSON.parse(text);
    return payload && typeof payload === "object" ? payload : null;
  } catch {
    return null;
  }
}

export const auth = {
  token: "",
  record: null,
  listeners: new Set(),
  load() {
    try {
      const saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
      this.token = (saved && typeof saved.token === "string") ? saved.token : "";
      this.record = (saved && (saved.record || saved.model)) || null;
    } catch {
      this.token = "";
      this.record = null;
    }
  },
  save(token, record) {
    this.token = token;
    this.record = record;
    localStorage.setItem(STORE_KEY, JSON.stringify({ token, record }));
  },
  clear() {
    this.token = "";
    this.record = null;
    localStorage.removeItem(STORE_KEY);
  },
  payload() {
    return this.token ? decodePayload(this.token) : null;
  },
  /** The token's expiry as a Date, or null. */
  expiresAt() {
    const p = this.payload();
    return p && typeof p.exp === "number" ? new Date(p.exp * 1000) : null;
  },
  isExpired() {
    const at = this.expiresAt();
    return !at || at.getTime() <= Date.now();
  },
  /** Called with a reason when the server refuses the token (401). */
  onUnauthorized(listener) {
    this.listeners.add(listener);
  },
  unauthorized(reason) {
    this.clear();
    for (const listener of this.listeners) listener(reason);
  },
};

async function parseError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const message = body && typeof body.message === "string" ? body.message : `The server answered ${response.status}.`;
  return new ApiError(response.status, message, body && body.data);
}

/** One API request; resolves to the parsed JSON (or null for an empty answer), rejects with ApiError. */
export async function request(method, path, { body, timeout = 30000, withAuth = true } = {}) {
  const headers = {};
  if (withAuth && auth.token) headers["Authorization"] = auth.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      signal: controller.signal, credentials: "omit", cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "The server cannot be reached.", {});
  } finally {
    clearTimeout(timer);
  }
  if (!response.ok) {
    const error = await parseError(response);
    if (response.status === 401 && headers["Authorization"]) auth.unauthorized(error.message);
    throw error;
  }
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** ``POST`` a file as multipart field ``file``; ``onProgress(loaded, total)`` from the browser's upload events. */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    if (auth.token) xhr.setRequestHeader("Authorization", auth.token);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve(null);
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      const error = new ApiError(xhr.status, body && typeof body.message === "string" ? body.message
        : `The server answered ${xhr.status}.`, body && body.data);
      if (xhr.status === 401) auth.unauthorized(error.message);
      reject(error);
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "The upload was interrupted: the server cannot be reached.", {})));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

/** The contract's validation errors as ``{"a.b": message}`` (``data`` nests field errors by section). */
export function fieldErrors(data, prefix = "") {
  const out = {};
  if (!data || typeof data !== "object") return out;
  for (const [key, value] of Object.entries(data)) {
    const path = prefix ? `${prefix}.${key}` : key;
    if (value && typeof value === "object" && typeof value.message === "string") out[path] = value.message;
    else if (value && typeof value === "object") Object.assign(out, fieldErrors(value, path));
  }
  return out;
}

/** An error in words: the API's message, then each field error. */
export function describe(error) {
  if (!(error instanceof ApiError)) return String(error && error.message ? error.message : error);
  const fields = Object.entries(fieldErrors(error.data)).map(([path, message]) => `${path}: ${message}`);
  return [error.message, ...fields].join("\n");
}
