// The backup flow driven by the official PocketBase JS SDK, against our server.
//
// Usage: node sdk_backups.mjs BASE_URL SUPERUSER_EMAIL SUPERUSER_PASSWORD [--bad-restore ZIP]
//
// Needs a server of its own (it restores a backup, which replaces all its data). Steps: superuser
// auth; a collection with a few records; create a backup and follow it through
// GET /api/backups/status (ours: our create answers at once and works in the background); list;
// download it with a file token and check it is a zip of the listed size; upload it again under
// another name; change the records; restore the first backup and wait for the server to come back
// (it re-executes itself); check the records are those of backup time; delete the uploaded copy;
// and a few error answers as the SDK reports them.
//
// With --bad-restore ZIP: upload ZIP (a zip with a damaged data.db), restore it, and check that
// the restore fails with its reason in the status while the data stays as it was.
//
// Prints one JSON object on stdout (exit code 0), or the error on stderr (exit code 1).

import { readFileSync } from "node:fs";
import PocketBase, { ClientResponseError } from "pocketbase";

const COLLECTION = "sdk_notes";
const BACKUP = "sdk_one.zip";
const UPLOADED = "sdk_two.zip";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function usage() {
    process.stderr.write("usage: node sdk_backups.mjs BASE_URL SUPERUSER_EMAIL SUPERUSER_PASSWORD [--bad-restore ZIP]\n");
    process.exit(2);
}

// What a ClientResponseError says, for the result; anything else is rethrown.
function describeError(err) {
    if (!(err instanceof ClientResponseError)) {
        throw err;
    }
    return { status: err.status, message: err.response?.message ?? null, data: err.response?.data ?? null };
}

async function expectError(promise) {
    try {
        await promise;
    } catch (err) {
        return describeError(err);
    }
    return { unexpectedSuccess: true };
}

// Poll our GET /api/backups/status until no job runs; returns `last`.
async function waitForJob(pb, timeoutMs = 20000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
        const status = await pb.send("/api/backups/status", { method: "GET" });
        if (status.active === null) {
            return status.last;
        }
        if (Date.now() > deadline) {
            throw new Error("the backup job did not end: " + JSON.stringify(status));
        }
        await sleep(50);
    }
}

// The names of the entries of a zip, read from its central directory.
function zipEntryNames(bytes) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let eocd = -1;
    for (let i = bytes.length - 22; i >= Math.max(0, bytes.length - 22 - 65535); i--) {
        if (view.getUint32(i, true) === 0x06054b50) {
            eocd = i;
            break;
        }
    }
    if (eocd < 0) {
        return null;
    }
    const count = view.getUint16(eocd + 10, true);
    let offset = view.getUint32(eocd + 16, true);
    const names = [];
    for (let n = 0; n < count; n++) {
        if (view.getUint32(offset, true) !== 0x02014b50) {
            return null;
        }
        const nameLength = view.getUint16(offset + 28, true);
        const extraLength = view.getUint16(offset + 30, true);
        const commentLength = view.getUint16(offset + 32, true);
        names.push(new TextDecoder().decode(bytes.subarray(offset + 46, offset + 46 + nameLength)));
        offset += 46 + nameLength + extraLength + commentLength;
    }
    return names.sort();
}

async function records(pb) {
    const items = await pb.collection(COLLECTION).getFullList({ sort: "title" });
    return items.map((r) => ({ id: r.id, title: r.title }));
}

async function main(baseURL, email, password) {
    const pb = new PocketBase(baseURL);
    pb.autoCancellation(false);
    const result = {};

    await pb.collection("_superusers").authWithPassword(email, password);
    result.auth = { isSuperuser: pb.authStore.isSuperuser };

    // data to back up
    await pb.collections.create({
        name: COLLECTION,
        type: "base",
        fields: [{ name: "title", type: "text", required: true }],
    });
    const made = {};
    for (const title of ["one", "two", "three"]) {
        made[title] = await pb.collection(COLLECTION).create({ title });
    }
    const atBackupTime = await records(pb);

    // create, and follow the job to its end
    result.create = { returned: await pb.backups.create(BACKUP) };
    const last = await waitForJob(pb);
    result.create.last = { op: last?.op, key: last?.key, ok: last?.ok, error: last?.error };

    // list
    let list = await pb.backups.getFullList();
    const listed = list.find((item) => item.key === BACKUP);
    result.list = {
        keys: list.map((item) => item.key),
        sizeIsPositiveInt: Number.isInteger(listed?.size) && listed.size > 0,
        modifiedFormat: /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z$/.test(listed?.modified ?? ""),
    };

    // download with a superuser file token
    const token = await pb.files.getToken();
    const url = pb.backups.getDownloadURL(token, BACKUP);
    const response = await fetch(url);
    const bytes = new Uint8Array(await response.arrayBuffer());
    const entries = zipEntryNames(bytes);
    result.download = {
        urlHasToken: url.includes("?token=" + encodeURIComponent(token)),
        status: response.status,
        contentType: response.headers.get("content-type"),
        contentDisposition: response.headers.get("content-disposition"),
        sizeMatchesList: bytes.length === listed?.size,
        startsWithZipMagic: bytes[0] === 0x50 && bytes[1] === 0x4b && bytes[2] === 3 && bytes[3] === 4,
        hasDataDb: entries?.includes("data.db") ?? false,
        hasAuxiliaryDb: entries?.includes("auxiliary.db") ?? false,
    };

    // upload the same bytes under another name
    result.upload = {
        returned: await pb.backups.upload({
            file: new File([bytes], UPLOADED, { type: "application/zip" }),
        }),
    };
    list = await pb.backups.getFullList();
    result.upload.keys = list.map((item) => item.key);
    result.upload.sizeMatches = list.find((item) => item.key === UPLOADED)?.size === bytes.length;

    // change the data after the backup
    await pb.collection(COLLECTION).create({ title: "four" });
    await pb.collection(COLLECTION).create({ title: "five" });
    await pb.collection(COLLECTION).update(made.one.id, { title: "one, edited" });
    await pb.collection(COLLECTION).delete(made.two.id);
    result.beforeRestore = (await records(pb)).map((r) => r.title);

    // restore, then wait for the re-executed server and its word on the restore
    result.restore = { returned: await pb.backups.restore(BACKUP) };
    const deadline = Date.now() + 30000;
    let connectionFailures = 0;
    const statusesSeen = new Set();
    let restored = null;
    while (restored === null) {
        if (Date.now() > deadline) {
            throw new Error("the server did not report the restore within 30 s");
        }
        try {
            await pb.health.check();
            const status = await pb.send("/api/backups/status", { method: "GET" });
            if (status.active === null && status.last?.op === "restore") {
                restored = status.last;
                break;
            }
        } catch (err) {
            const info = describeError(err);
            if (info.status === 0) {
                connectionFailures++; // the old process stopped accepting, or reset a kept-alive connection
            } else {
                statusesSeen.add(info.status);
            }
        }
        await sleep(50);
    }
    result.restore.last = { op: restored.op, key: restored.key, ok: restored.ok, error: restored.error };
    result.restore.errorStatusesWhileWaiting = [...statusesSeen].sort();
    result.restore.connectionFailuresAreFew = connectionFailures < 100;
    result.info = { connectionFailuresWhileWaiting: connectionFailures }; // not compared

    // a new login, and the data of backup time
    pb.authStore.clear();
    await pb.collection("_superusers").authWithPassword(email, password);
    const afterRestore = await records(pb);
    result.afterRestore = {
        titles: afterRestore.map((r) => r.title),
        sameRecordsAsAtBackupTime: JSON.stringify(afterRestore) === JSON.stringify(atBackupTime),
        backups: (await pb.backups.getFullList()).map((item) => item.key),
    };
    const health = await pb.health.check();
    result.afterRestore.health = { code: health.code, canBackup: health.data?.canBackup ?? null };

    // delete the uploaded copy
    result.delete = { returned: await pb.backups.delete(UPLOADED) };
    result.delete.keys = (await pb.backups.getFullList()).map((item) => item.key);

    // error answers through the SDK
    result.errors = {
        createBadName: await expectError(pb.backups.create("Bad Name.zip")),
        createExisting: await expectError(pb.backups.create(BACKUP)),
        restoreMissing: await expectError(pb.backups.restore("missing.zip")),
        deleteMissing: await expectError(pb.backups.delete("missing.zip")),
        uploadNotAZip: await expectError(pb.backups.upload({
            file: new File(["this is not a zip\n"], "not_a_zip.zip", { type: "application/zip" }),
        })),
    };
    const guest = new PocketBase(baseURL);
    result.errors.listAsGuest = await expectError(guest.backups.getFullList());
    const download = await fetch(pb.backups.getDownloadURL(pb.authStore.token, BACKUP));
    result.errors.downloadWithAuthToken = { status: download.status, message: (await download.json()).message };

    return result;
}

// A restore of a backup whose data.db is damaged: refused after the 204, data untouched.
async function badRestore(baseURL, email, password, zipPath) {
    const pb = new PocketBase(baseURL);
    pb.autoCancellation(false);
    const result = {};
    await pb.collection("_superusers").authWithPassword(email, password);
    await pb.collections.create({
        name: COLLECTION,
        type: "base",
        fields: [{ name: "title", type: "text", required: true }],
    });
    await pb.collection(COLLECTION).create({ title: "kept" });

    const bytes = readFileSync(zipPath);
    result.upload = {
        returned: await pb.backups.upload({ file: new File([bytes], "sdk_bad.zip", { type: "application/zip" }) }),
        keys: (await pb.backups.getFullList()).map((item) => item.key),
    };
    result.restore = { returned: await pb.backups.restore("sdk_bad.zip") };
    const deadline = Date.now() + 20000;
    let status;
    for (;;) {
        status = await pb.send("/api/backups/status", { method: "GET" });
        if (status.active === null && status.last?.op === "restore") {
            break;
        }
        if (Date.now() > deadline) {
            throw new Error("the restore did not end: " + JSON.stringify(status));
        }
        await sleep(50);
    }
    result.restore.last = { op: status.last.op, key: status.last.key, ok: status.last.ok, error: status.last.error };
    result.after = {
        titles: (await records(pb)).map((r) => r.title),
        backups: (await pb.backups.getFullList()).map((item) => item.key),
        authStillValid: (await pb.collection("_superusers").authRefresh()).record?.email === email,
    };
    const health = await pb.health.check();
    result.after.health = { code: health.code, canBackup: health.data?.canBackup ?? null };
    return result;
}

const [baseURL, email, password, mode, zipPath] = process.argv.slice(2);
if (!baseURL || !email || !password || (mode !== undefined && (mode !== "--bad-restore" || !zipPath))) {
    usage();
}

(mode ? badRestore(baseURL, email, password, zipPath) : main(baseURL, email, password)).then(
    (result) => {
        process.stdout.write(JSON.stringify(result, null, 2) + "\n");
        process.exit(0);
    },
    (err) => {
        let msg = err?.stack || String(err);
        if (err instanceof ClientResponseError) {
            msg += "\nstatus: " + err.status + "\nurl: " + err.url + "\nresponse: " + JSON.stringify(err.response);
        }
        process.stderr.write(msg + "\n");
        process.exit(1);
    },
);
