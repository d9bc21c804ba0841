// End-to-end flow driven by the official PocketBase JS SDK.
//
// Usage: node sdk_flow.mjs BASE_URL SUPERUSER_EMAIL SUPERUSER_PASSWORD
//
// Runs the same sequence of SDK calls against any PocketBase-compatible
// server and prints one JSON object (deterministic: no ids, timestamps or
// random names) on stdout. Exit code 0 when every step ran, 1 (with the error
// on stderr) on any unexpected failure.

import { randomBytes } from "node:crypto";
import PocketBase, { ClientResponseError } from "pocketbase";

const COLLECTION_PREFIX = "e2e_docs_";
const FILE_CONTENT = "hello world\n";

function usage() {
    process.stderr.write(
        "usage: node sdk_flow.mjs BASE_URL SUPERUSER_EMAIL SUPERUSER_PASSWORD\n",
    );
    process.exit(2);
}

async function main(baseURL, email, password) {
    const pb = new PocketBase(baseURL);
    const result = {};
    const collectionName = COLLECTION_PREFIX + randomBytes(6).toString("hex");
    let collection = null;
    let record = null;
    let cleanedUp = false;

    try {
        // a. superuser password auth
        await pb.collection("_superusers").authWithPassword(email, password);
        result.auth = {
            isValid: pb.authStore.isValid,
            isSuperuser: pb.authStore.isSuperuser,
            email: pb.authStore.record?.email ?? null,
            collectionName: pb.authStore.record?.collectionName ?? null,
        };

        // b. create a base collection (>=0.23 "fields" format)
        collection = await pb.collections.create({
            name: collectionName,
            type: "base",
            fields: [
                { name: "title", type: "text", required: true },
                {
                    name: "attachment",
                    type: "file",
                    maxSelect: 1,
                    maxSize: 5000000,
                    mimeTypes: ["text/plain"],
                    protected: true,
                },
            ],
            listRule: "",
            viewRule: "",
            createRule: null,
            updateRule: null,
            deleteRule: null,
        });
        result.createCollection = {
            namePrefix: collection.name.startsWith(COLLECTION_PREFIX)
                ? COLLECTION_PREFIX
                : collection.name,
            nameMatches: collection.name === collectionName,
            type: collection.type,
            fields: (collection.fields || [])
                .map((f) => ({ name: f.name, type: f.type }))
                .sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0)),
            listRule: collection.listRule,
            viewRule: collection.viewRule,
            createRule: collection.createRule,
            updateRule: collection.updateRule,
            deleteRule: collection.deleteRule,
        };

        // c. create a record with a file (multipart/form-data)
        const form = new FormData();
        form.append("title", "hello");
        form.append(
            "attachment",
            new Blob([FILE_CONTENT], { type: "text/plain" }),
            "hello.txt",
        );
        record = await pb.collection(collectionName).create(form);
        result.createRecord = {
            title: record.title,
            attachmentLooksRight:
                typeof record.attachment === "string" &&
                record.attachment.length > 0 &&
                record.attachment.startsWith("hello") &&
                record.attachment.endsWith(".txt"),
        };

        // d. list
        const list = await pb.collection(collectionName).getList(1, 10);
        const full = await pb.collection(collectionName).getFullList();
        result.list = {
            page: list.page,
            perPage: list.perPage,
            totalItems: list.totalItems,
            totalPages: list.totalPages,
            itemsLength: list.items.length,
            firstTitle: list.items[0]?.title ?? null,
            fullListLength: full.length,
        };

        // e. protected file access
        const plainURL = pb.files.getURL(record, record.attachment);
        const noTokenResp = await fetch(plainURL);
        await noTokenResp.arrayBuffer(); // drain
        const fileToken = await pb.files.getToken();
        const tokenResp = await fetch(
            pb.files.getURL(record, record.attachment, { token: fileToken }),
        );
        const tokenBody = await tokenResp.text();
        result.protectedFile = {
            withoutTokenStatus: noTokenResp.status,
            fileTokenIsNonEmptyString:
                typeof fileToken === "string" && fileToken.length > 0,
            withTokenStatus: tokenResp.status,
            withTokenBody: tokenBody,
        };

        // e2. with the public viewRule above, PocketBase serves protected files
        // to anyone (the file token only feeds @request.auth into the viewRule
        // check). Restrict viewRule to authenticated users and retry: now only
        // the ?token= query param grants access, the Authorization header
        // alone does not.
        const restrictedRule = '@request.auth.id != ""';
        const updated = await pb.collections.update(collection.id, {
            viewRule: restrictedRule,
        });
        const rNoToken = await fetch(plainURL);
        await rNoToken.arrayBuffer();
        const rHeaderOnly = await fetch(plainURL, {
            headers: { Authorization: pb.authStore.token },
        });
        await rHeaderOnly.arrayBuffer();
        const rToken = await fetch(
            pb.files.getURL(record, record.attachment, {
                token: await pb.files.getToken(),
            }),
        );
        const rTokenBody = await rToken.text();
        result.protectedFileRestricted = {
            viewRule: updated.viewRule,
            withoutTokenStatus: rNoToken.status,
            authHeaderOnlyStatus: rHeaderOnly.status,
            withTokenStatus: rToken.status,
            withTokenBody: rTokenBody,
        };

        // f. validation error path
        try {
            await pb.collection(collectionName).create({});
            result.validationError = { unexpectedSuccess: true };
        } catch (err) {
            if (!(err instanceof ClientResponseError)) {
                throw err;
            }
            const data = err.response?.data || {};
            result.validationError = {
                isClientResponseError: true,
                status: err.status,
                dataKeys: Object.keys(data).sort(),
                titleCode: data.title?.code ?? null,
            };
        }

        // g. auth refresh
        await pb.collection("_superusers").authRefresh();
        result.authRefresh = {
            isValid: pb.authStore.isValid,
            isSuperuser: pb.authStore.isSuperuser,
        };

        // h. health
        const health = await pb.health.check();
        result.health = { code: health.code, message: health.message };

        // i. cleanup
        const recordDeleted = await pb.collection(collectionName).delete(record.id);
        const collectionDeleted = await pb.collections.delete(collection.id);
        cleanedUp = true;
        result.cleanup = {
            recordDeleted: recordDeleted === true,
            collectionDeleted: collectionDeleted === true,
        };
    } finally {
        // best-effort cleanup when a step failed midway
        if (!cleanedUp && collection) {
            try {
                await pb.collections.delete(collection.id);
            } catch (_) {
                // ignore
            }
        }
    }

    return result;
}

const [baseURL, email, password] = process.argv.slice(2);
if (!baseURL || !email || !password) {
    usage();
}

main(baseURL, email, password).then(
    (result) => {
        process.stdout.write(JSON.stringify(result, null, 2) + "\n");
        process.exit(0);
    },
    (err) => {
        let msg = err?.stack || String(err);
        if (err instanceof ClientResponseError) {
            msg +=
                "\nstatus: " +
                err.status +
                "\nurl: " +
                err.url +
                "\nresponse: " +
                JSON.stringify(err.response);
        }
        process.stderr.write(msg + "\n");
        process.exit(1);
    },
);
