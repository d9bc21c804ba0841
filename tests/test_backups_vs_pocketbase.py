"""The backup routes, request by request, against our server and a live PocketBase 0.40.6.

One fixed sequence of raw HTTP requests (list, create, upload, download, delete, restore, with
no token, a user token, a superuser token, file tokens of both kinds) runs against each server.
Every answer is reduced to what must match (status, content type, JSON error message and data,
download headers) with the values that vary between runs replaced by placeholders (timestamps in
auto names, sizes, dates, the random stored name in PocketBase's mime-type message). The two
lists of answers must be equal, except for the steps in ``OUR_DIFFERENCES``: there each server
must give exactly its own side, and the second test keeps PocketBase's side true.

No restore succeeds here: PocketBase restarts itself after one (``test_sdk_backups`` does ours).
"""

from __future__ import annotations

import difflib
import io
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from conftest import (SUPERUSER_EMAIL, SUPERUSER_PASSWORD, ServerProcess, dumps, start_pocketbase, start_server,
                      terminate)

Answer = dict[str, Any]

UNAUTHORIZED = {"status": 401, "type": "application/json",
                "body": {"data": {}, "message": "The request requires valid record authorization token.", "status": 401}}
FORBIDDEN = {"status": 403, "type": "application/json",
             "body": {"data": {}, "message": "The authorized record is not allowed to perform this action.", "status": 403}}
NO_CONTENT = {"status": 204, "type": None, "body": ""}


def validation(field: str, code: str, message: str) -> Answer:
    return {"status": 400, "type": "application/json",
            "body": {"data": {field: {"code": code, "message": message}},
                     "message": "An error occurred while validating the submitted data.", "status": 400}}


@dataclass(frozen=True)
class Difference:
    pocketbase: Answer
    ours: Answer
    reason: str


# Steps where we answer differently on purpose (CONTRACT.md, "Backups"). Each side is the full
# normalized answer that server must give.
OUR_DIFFERENCES: dict[str, Difference] = {
    "DELETE missing.zip (superuser)": Difference(
        pocketbase={"status": 400, "type": "application/json", "body": {
            "data": {},
            "message": "Invalid or already deleted backup file. Raw error: \n[key: missing.zip] remove <path>: "
                       "no such file or directory\nresource not found.",
            "status": 400}},
        ours={"status": 404, "type": "application/json",
              "body": {"data": {}, "message": "The requested resource wasn't found.", "status": 404}},
        reason="contract: DELETE of a missing backup is 404 (ours: PocketBase says 400), and error "
               "messages never contain a filesystem path (PocketBase leaks `remove /abs/path/...`)",
    ),
    "list after three auto-named creates within one second": Difference(
        pocketbase={"status": 200, "type": "application/json", "body": [
            {"key": "pb_backup_acme_<YYYYMMDDHHMMSS>.zip", "size": "<size>", "modified": "<datetime>"}]},
        ours={"status": 200, "type": "application/json", "body": [
            {"key": "pb_backup_acme_<YYYYMMDDHHMMSS>.zip", "size": "<size>", "modified": "<datetime>"},
            {"key": "pb_backup_acme_<YYYYMMDDHHMMSS>_2.zip", "size": "<size>", "modified": "<datetime>"},
            {"key": "pb_backup_acme_<YYYYMMDDHHMMSS>_3.zip", "size": "<size>", "modified": "<datetime>"}]},
        reason="ours: a backup is never overwritten; a second auto-named backup within the same second "
               "gets a _2 suffix (PocketBase replaces the first one with it)",
    ),
    "upload 'Bad Name.zip' (a real backup)": Difference(
        pocketbase=NO_CONTENT,
        ours=validation("file", "validation_match_invalid", "Must be in a valid format."),
        reason="contract (ours): uploaded names are validated like created ones "
               "(^[a-z0-9_-]+\\.zip$); PocketBase accepts `Bad Name.zip`",
    ),
    "upload other.zip (a valid zip without data.db)": Difference(
        pocketbase=NO_CONTENT,
        ours=validation("file", "validation_invalid_backup", "Invalid backup: the archive has no data.db at its root."),
        reason="contract (ours): an upload is checked to be a readable zip holding data.db at its root "
               "before it is accepted",
    ),
}

DATETIME_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z$")
AUTO_NAME_RE = re.compile(r"^(@auto_)?pb_backup_([a-z0-9_]+?)_\d{14}(_\d+)?\.zip$")
HTTP_DATE_RE = re.compile(r"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT$")
DOWNLOAD_HEADERS = ("accept-ranges", "cache-control", "content-disposition", "content-length", "content-range",
                    "content-security-policy", "content-type")
ERROR_HEADERS = ("content-disposition", "content-length", "content-range", "content-security-policy", "content-type")


# --- normalizing answers ------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    text = re.sub(r'"[^"]*" mime type must be', '"<stored name>" mime type must be', text)
    return re.sub(r"remove /\S+:", "remove <path>:", text)


def normalize_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: normalize_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalize_json(item) for item in value]
    if isinstance(value, str):
        return normalize_text(value)
    return value


def content_type(response: httpx.Response) -> str | None:
    value = response.headers.get("content-type")
    return value.split(";", 1)[0].strip() if value else None


def answer(response: httpx.Response) -> Answer:
    """Status, content type and body (JSON normalized) of an ordinary API answer."""
    kind = content_type(response)
    body: Any = response.text
    if kind == "application/json":
        body = normalize_json(response.json())
    return {"status": response.status_code, "type": kind, "body": body}


def backup_list(response: httpx.Response) -> Answer:
    """``GET /api/backups``: auto names, sizes and dates replaced by placeholders."""
    result = answer(response)
    if response.status_code == 200 and isinstance(result["body"], list):
        items = []
        for item in result["body"]:
            shown = dict(item)
            if isinstance(shown.get("key"), str):
                shown["key"] = AUTO_NAME_RE.sub(lambda m: f"{m[1] or ''}pb_backup_{m[2]}_<YYYYMMDDHHMMSS>{m[3] or ''}.zip",
                                                shown["key"])
            if isinstance(shown.get("size"), int) and shown["size"] > 0:
                shown["size"] = "<size>"
            if isinstance(shown.get("modified"), str) and DATETIME_RE.match(shown["modified"]):
                shown["modified"] = "<datetime>"
            # ours: the list's one extra key (issue 15; the contract allows cheap extra keys), a bool
            if isinstance(shown.get("pinned"), bool):
                del shown["pinned"]
            items.append(shown)
        result["body"] = items
    return result


def sizes(response: httpx.Response) -> dict[str, int]:
    assert response.status_code == 200, response.text
    return {item["key"]: item["size"] for item in response.json()}


def download(response: httpx.Response, full: bytes | None, size: int) -> Answer:
    """A backup download: the headers that matter (sizes relative to the backup's ``size``),
    and what the body is (the whole file, a slice of it, or an error)."""
    if content_type(response) == "application/json":
        return answer(response)

    def relative(number: int) -> str:
        if number == size:
            return "SIZE"
        if size - 100 < number < size:
            return f"SIZE-{size - number}"
        return str(number)

    headers: dict[str, Any] = {}
    # An unsatisfiable range: what describes the error (PocketBase leaves out Accept-Ranges,
    # Cache-Control and Last-Modified there; those are not compared).
    names = DOWNLOAD_HEADERS if response.status_code in (200, 206) else ERROR_HEADERS
    for name in names:
        value = response.headers.get(name)
        if value is None:
            continue
        if name == "content-length":
            value = relative(int(value))
        elif name == "content-range":
            value = re.sub(r"\d+", lambda m: relative(int(m[0])), value)
        headers[name] = value
    if response.status_code in (200, 206):
        headers["last-modified"] = bool(HTTP_DATE_RE.match(response.headers.get("last-modified", "")))
    body: Any
    if response.request.method == "HEAD":
        body = f"{len(response.content)} bytes"
    elif response.status_code in (200, 206) and full is not None:
        wanted = response.request.headers.get("range")
        if wanted is None:
            body = "the whole backup" if response.content == full else f"{len(response.content)} other bytes"
        else:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            expected = full[-int(last):] if not first else full[int(first):int(last) + 1 if last else None]
            body = "the requested slice" if response.content == expected else f"{len(response.content)} other bytes"
    else:
        body = response.text
    return {"status": response.status_code, "type": content_type(response), "headers": headers, "body": body}


# --- the sequence -------------------------------------------------------------------------------


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def wait_for_our_job(http: httpx.Client, su: dict[str, str]) -> dict[str, Any] | None:
    """Ours: poll ``/api/backups/status`` until no job runs; returns ``last``."""
    deadline = time.monotonic() + 20
    while True:
        status = http.get("/api/backups/status", headers=su)
        assert status.status_code == 200, status.text
        body = status.json()
        if body["active"] is None:
            return body["last"]
        assert time.monotonic() < deadline, f"the backup job did not end: {body}"
        time.sleep(0.05)


@dataclass
class Run:
    answers: dict[str, Answer]
    notes: dict[str, Any]  # facts checked per server (not compared)


def run_sequence(url: str, settle: Callable[[httpx.Client, dict[str, str]], Any]) -> Run:
    """The fixed sequence against the server at ``url``; ``settle`` waits for a started backup
    job to end (PocketBase's create is synchronous; ours works in the background)."""
    answers: dict[str, Answer] = {}
    notes: dict[str, Any] = {}

    def put(step: str, result: Answer) -> None:
        assert step not in answers, step
        answers[step] = result

    with httpx.Client(base_url=url, timeout=30) as http:
        login = http.post("/api/collections/_superusers/auth-with-password",
                          json={"identity": SUPERUSER_EMAIL, "password": SUPERUSER_PASSWORD})
        assert login.status_code == 200, login.text
        su_token = login.json()["token"]
        su = {"Authorization": su_token}
        # A user, created by the superuser (whatever the users createRule).
        created = http.post("/api/collections/users/records", headers=su,
                            json={"email": "user1@example.com", "password": "1234567890",
                                  "passwordConfirm": "1234567890"})
        assert created.status_code == 200, created.text
        user_login = http.post("/api/collections/users/auth-with-password",
                               json={"identity": "user1@example.com", "password": "1234567890"})
        assert user_login.status_code == 200, user_login.text
        user = {"Authorization": user_login.json()["token"]}

        # list
        put("list (no token)", backup_list(http.get("/api/backups")))
        put("list (user token)", backup_list(http.get("/api/backups", headers=user)))
        put("list (superuser), empty", backup_list(http.get("/api/backups", headers=su)))

        # create
        # Three auto-named backups within one second (so with one name): PocketBase answers 204
        # to each and keeps one file.
        while time.time() % 1 > 0.2:
            time.sleep(0.01)
        second = int(time.time())
        put("create {} (superuser)", answer(http.post("/api/backups", headers=su, json={})))
        notes["after create {}"] = settle(http, su)
        put("create {} again within the same second", answer(http.post("/api/backups", headers=su, json={})))
        settle(http, su)
        put("create {name: null} within the same second",
            answer(http.post("/api/backups", headers=su, json={"name": None})))
        settle(http, su)
        notes["auto-named creates within one second"] = int(time.time()) == second
        listed_auto = http.get("/api/backups", headers=su)
        put("list after three auto-named creates within one second", backup_list(listed_auto))
        for item in listed_auto.json():  # (not recorded) keep one auto backup, as PocketBase has
            if re.search(r"_\d{14}_\d+\.zip$", item["key"]):
                assert http.delete(f"/api/backups/{item['key']}", headers=su).status_code == 204
        for label, name in (("'Bad Name.zip'", "Bad Name.zip"), ("'noext'", "noext"), ("'UPPER.zip'", "UPPER.zip"),
                            ("<151 characters>", "a" * 147 + ".zip"), ("'../escape.zip'", "../escape.zip"),
                            ("'x.zip.txt'", "x.zip.txt"), ("123", 123), ("['a.zip']", ["a.zip"])):
            put(f"create {{name: {label}}}", answer(http.post("/api/backups", headers=su, json={"name": name})))
        put("create, body not JSON", answer(http.post(
            "/api/backups", headers={**su, "Content-Type": "application/json"}, content=b"{bad")))
        put("create (user token)", answer(http.post("/api/backups", headers=user, json={})))
        put("create (no token)", answer(http.post("/api/backups", json={})))
        put("create {name: 'ok.zip'}", answer(http.post("/api/backups", headers=su, json={"name": "ok.zip"})))
        notes["after create ok.zip"] = settle(http, su)
        put("create {name: 'ok.zip'} again (exists)",
            answer(http.post("/api/backups", headers=su, json={"name": "ok.zip"})))
        listed = http.get("/api/backups", headers=su)
        put("list (superuser) after creates", backup_list(listed))
        size = sizes(listed)["ok.zip"]

        # download
        file_token = http.post("/api/files/token", headers=su)
        assert file_token.status_code == 200, file_token.text
        su_file = file_token.json()["token"]
        user_file_token = http.post("/api/files/token", headers=user)
        assert user_file_token.status_code == 200, user_file_token.text
        user_file = user_file_token.json()["token"]
        good = http.get("/api/backups/ok.zip", params={"token": su_file})
        full = good.content if good.status_code == 200 else None
        put("download (no token)", download(http.get("/api/backups/ok.zip"), full, size))
        put("download (?token=superuser auth token)",
            download(http.get("/api/backups/ok.zip", params={"token": su_token}), full, size))
        put("download (Authorization: superuser auth token)",
            download(http.get("/api/backups/ok.zip", headers=su), full, size))
        put("download (?token=user file token)",
            download(http.get("/api/backups/ok.zip", params={"token": user_file}), full, size))
        put("download (?token=wrong)", download(http.get("/api/backups/ok.zip", params={"token": "wrong"}), full, size))
        put("download (?token=superuser file token)", download(good, full, size))
        notes["download is a zip of the listed size"] = (full is not None and len(full) == size
                                                          and zipfile.is_zipfile(io.BytesIO(full)))
        put("HEAD download (superuser file token)",
            download(http.head("/api/backups/ok.zip", params={"token": su_file}), full, size))
        for wanted in ("bytes=0-9", "bytes=-5", "bytes=99999999-"):
            put(f"download Range: {wanted}", download(
                http.get("/api/backups/ok.zip", params={"token": su_file}, headers={"Range": wanted}), full, size))
        put("download missing.zip (superuser file token)",
            download(http.get("/api/backups/missing.zip", params={"token": su_file}), full, size))

        # upload
        put("upload, multipart without a file part", answer(http.post(
            "/api/backups/upload", headers=su, files={"other": ("a.txt", b"hello\n", "text/plain")})))
        put("upload, no body at all", answer(http.post("/api/backups/upload", headers=su)))
        put("upload text named x.zip", answer(http.post(
            "/api/backups/upload", headers=su, files={"file": ("x.zip", b"this is not a zip\n", "application/zip")})))
        real = full or b""
        put("upload uploaded.zip (a real backup)", answer(http.post(
            "/api/backups/upload", headers=su, files={"file": ("uploaded.zip", real, "application/zip")})))
        put("upload uploaded.zip again (exists)", answer(http.post(
            "/api/backups/upload", headers=su, files={"file": ("uploaded.zip", real, "application/zip")})))
        put("upload (user token)", answer(http.post(
            "/api/backups/upload", headers=user, files={"file": ("u.zip", real, "application/zip")})))
        put("upload (no token)", answer(http.post(
            "/api/backups/upload", files={"file": ("u.zip", real, "application/zip")})))
        listed = http.get("/api/backups", headers=su)
        put("list (superuser) after uploads", backup_list(listed))
        notes["uploaded.zip has the size of ok.zip"] = sizes(listed).get("uploaded.zip") == size
        put("upload 'Bad Name.zip' (a real backup)", answer(http.post(
            "/api/backups/upload", headers=su, files={"file": ("Bad Name.zip", real, "application/zip")})))
        put("upload other.zip (a valid zip without data.db)", answer(http.post(
            "/api/backups/upload", headers=su,
            files={"file": ("other.zip", zip_bytes({"a.txt": b"not a backup\n"}), "application/zip")})))
        # Whatever those two left behind goes, so that the lists below compare again (not compared).
        for key in sizes(http.get("/api/backups", headers=su)):
            if key in ("Bad Name.zip", "other.zip"):
                assert http.delete(f"/api/backups/{key}", headers=su).status_code == 204

        # delete
        put("DELETE missing.zip (superuser)", answer(http.delete("/api/backups/missing.zip", headers=su)))
        put("DELETE missing.zip (user token)", answer(http.delete("/api/backups/missing.zip", headers=user)))
        put("DELETE ok.zip (no token)", answer(http.delete("/api/backups/ok.zip")))
        put("DELETE ok.zip (user token)", answer(http.delete("/api/backups/ok.zip", headers=user)))
        put("DELETE uploaded.zip (superuser)", answer(http.delete("/api/backups/uploaded.zip", headers=su)))
        put("list (superuser) after delete", backup_list(http.get("/api/backups", headers=su)))

        # restore (never a successful one: PocketBase would restart itself)
        put("restore missing.zip (superuser)", answer(http.post("/api/backups/missing.zip/restore", headers=su)))
        put("restore a%2Fb.zip (superuser; no such key can exist)",
            answer(http.post("/api/backups/a%2Fb.zip/restore", headers=su)))
        put("restore ok.zip (no token)", answer(http.post("/api/backups/ok.zip/restore")))
        put("restore ok.zip (user token)", answer(http.post("/api/backups/ok.zip/restore", headers=user)))
        put("list (superuser) at the end", backup_list(http.get("/api/backups", headers=su)))
    return Run(answers, notes)


# --- fixtures: each server runs the sequence once -----------------------------------------------


@pytest.fixture(scope="module")
def pocketbase_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    url, process = start_pocketbase(tmp_path_factory.mktemp("pocketbase"))
    try:
        yield run_sequence(url, lambda http, su: None)
    finally:
        terminate(process)


@pytest.fixture(scope="module")
def our_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    server: ServerProcess = start_server(tmp_path_factory.mktemp("ours"))
    try:
        yield run_sequence(server.url, wait_for_our_job)
    finally:
        server.stop()


def show(value: Any) -> str:
    return dumps(value) if not isinstance(value, str) else value


def mismatch_report(title: str, problems: list[tuple[str, Any, Any, str]]) -> str:
    """A readable report: for each step, what was expected and what came, and a line diff."""
    lines = [title]
    for step, expected, got, label in problems:
        lines.append(f"\n=== {step}  ({label})")
        diff = difflib.unified_diff(show(expected).splitlines(), show(got).splitlines(),
                                    "expected", "got", lineterm="", n=2)
        lines.extend(diff)
    return "\n".join(lines)


# --- the tests ----------------------------------------------------------------------------------


def test_our_backup_routes_answer_as_pocketbase_except_the_listed_differences(
        pocketbase_run: Run, our_run: Run) -> None:
    theirs, ours = pocketbase_run.answers, our_run.answers
    assert list(ours) == list(theirs)
    assert set(OUR_DIFFERENCES) <= set(ours), "OUR_DIFFERENCES names a step the sequence does not have"
    problems: list[tuple[str, Any, Any, str]] = []
    for step, their_answer in theirs.items():
        if step in OUR_DIFFERENCES:
            if ours[step] != OUR_DIFFERENCES[step].ours:
                problems.append((step, OUR_DIFFERENCES[step].ours, ours[step],
                                 "a listed difference: expected our side from OUR_DIFFERENCES"))
        elif ours[step] != their_answer:
            problems.append((step, their_answer, ours[step], "expected = PocketBase 0.40.6, got = ours"))
    assert not problems, mismatch_report(f"{len(problems)} of {len(theirs)} steps differ", problems)
    # What each of our own jobs ended with, and the download itself.
    for step in ("after create {}", "after create ok.zip"):
        last = our_run.notes[step]
        assert last is not None and last["op"] == "create" and last["ok"] is True and last["error"] is None, last
    assert our_run.notes["after create ok.zip"]["key"] == "ok.zip"
    assert AUTO_NAME_RE.match(our_run.notes["after create {}"]["key"])
    assert our_run.notes["auto-named creates within one second"] is True
    assert our_run.notes["download is a zip of the listed size"] is True
    assert our_run.notes["uploaded.zip has the size of ok.zip"] is True


def test_pocketbase_still_gives_its_side_of_each_listed_difference(pocketbase_run: Run) -> None:
    problems = [(step, difference.pocketbase, pocketbase_run.answers.get(step),
                 f"expected = PocketBase's side in OUR_DIFFERENCES; reason listed: {difference.reason}")
                for step, difference in OUR_DIFFERENCES.items()
                if pocketbase_run.answers.get(step) != difference.pocketbase]
    assert not problems, mismatch_report("PocketBase no longer answers as OUR_DIFFERENCES says", problems)
    assert pocketbase_run.notes["auto-named creates within one second"] is True
    assert pocketbase_run.notes["download is a zip of the listed size"] is True
    assert pocketbase_run.notes["uploaded.zip has the size of ok.zip"] is True
    # Both sides of a difference differ, or it is not one.
    for step, difference in OUR_DIFFERENCES.items():
        assert difference.pocketbase != difference.ours, step
