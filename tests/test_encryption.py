"""Encrypted backups (issue 17; CONTRACT.md, "Encryption"): age files the real ``age`` tool
decrypts, and ``age``-made files we restore; identities in the request only, never stored, logged
or echoed; the three failure reasons with the data untouched; uploads; safety copies; key
rotation; S3; the CLI. One server for the module (its full restores re-exec it in place)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, Api, S3Server, ServerProcess, run_cli, wait_for, wait_gate_held
from test_backup_restore import add_note, backup, login, make_notes, notes, wait_idle, wait_restored

AGE = shutil.which("age") or "age"
AGE_MAGIC = b"age-encryption.org/v1\n"
REQUIRED = "this backup is encrypted: an identity is required"
MISMATCH = "the identity does not match any recipient of this backup"
DAMAGED = "the backup is damaged or was tampered with"


class Key:
    """An age key pair made by ``age-keygen``: ``file`` (the identity file), ``secret``, ``public``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.file = directory / f"{name}.txt"
        subprocess.run(["age-keygen", "-o", str(self.file)], check=True, capture_output=True)
        lines = self.file.read_text().splitlines()
        self.secret = next(line for line in lines if line.startswith("AGE-SECRET-KEY-1"))
        self.public = subprocess.run(["age-keygen", "-y", str(self.file)], check=True, capture_output=True,
                                     text=True).stdout.strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server holding notes, a plain backup ``plain.zip`` made before encryption was turned on,
    then ``enc.zip`` encrypted to key ``k1``."""
    tmp = tmp_path_factory.mktemp("enc")
    data_dir = tmp / "pb_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=data_dir)
    server = ServerProcess(data_dir)
    server.start()
    api = Api(server)
    su = login(server)
    make_notes(api, su)
    add_note(api, su, "one", 1, os.urandom(30_000))
    add_note(api, su, "two", 2)
    backup(server, "plain.zip")
    k1, k2 = Key(tmp, "k1"), Key(tmp, "k2")
    set_recipients(server, [k1.public])
    backup(server, "enc.zip")
    try:
        yield {"server": server, "api": api, "tmp": tmp, "k1": k1, "k2": k2}
    finally:
        api.close()
        server.stop()


def set_recipients(server: ServerProcess, recipients: list[str]) -> None:
    response = httpx.patch(server.url + "/api/settings", headers=login(server),
                           json={"backups": {"encryption": {"recipients": recipients}}}, timeout=30)
    assert response.status_code == 200, response.text


def restore_with(server: ServerProcess, key: str, body: dict[str, Any] | None) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/api/backups/{key}/restore", headers=login(server), json=body, timeout=30)
    assert response.status_code == 204, response.text
    return wait_restored(server, key)


def inodes(server: ServerProcess) -> dict[str, int]:
    return {name: (server.data_dir / name).stat().st_ino for name in ("data.db", "auxiliary.db")}


def age_decrypt(path: Path, key: Key, out: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([AGE, "-d", "-i", str(key.file), "-o", str(out), str(path)], capture_output=True)


def secrets_absent(server: ServerProcess, *secrets: str) -> None:
    """No secret in the status, the settings, the logs table or the server's output."""
    su = login(server)
    answers = [httpx.get(server.url + path, headers=su, timeout=30)
               for path in ("/api/backups/status", "/api/settings", "/api/backups")]
    assert all(answer.status_code == 200 for answer in answers)
    texts = [answer.text for answer in answers]
    texts.append(server.output())
    texts += [row["data"] + row["message"] for row in server.sql("SELECT message, data FROM _logs", db="auxiliary.db")]
    for secret in secrets:
        assert all(secret not in text for text in texts)


# --- settings ------------------------------------------------------------------------------------


def test_settings_validate_recipients_and_refuse_the_passphrase(env: dict[str, Any]) -> None:
    server, k1 = env["server"], env["k1"]
    su = login(server)
    bad = httpx.patch(server.url + "/api/settings", headers=su, timeout=30,
                      json={"backups": {"encryption": {"recipients": [k1.public, "age1nope"]}}})
    assert bad.status_code == 400
    problem = bad.json()["data"]["backups"]["encryption"]["recipients"]
    assert problem["code"] == "validation_invalid_recipient" and "Recipient 2" in problem["message"]
    secret = "correct horse battery staple"
    refused = httpx.patch(server.url + "/api/settings", headers=su, timeout=30,
                          json={"backups": {"encryption": {"passphrase": secret}}})
    assert refused.status_code == 400
    assert refused.json()["data"]["backups"]["encryption"]["passphrase"]["code"] == "validation_not_supported"
    assert secret not in refused.text
    shown = httpx.get(server.url + "/api/settings", headers=su, timeout=30).json()["backups"]["encryption"]
    assert shown == {"recipients": [k1.public]}  # the passphrase is write-only: never shown


# --- the format: age on both sides ---------------------------------------------------------------


def test_our_backup_is_age_and_the_age_tool_decrypts_it(env: dict[str, Any]) -> None:
    server, tmp = env["server"], env["tmp"]
    stored = server.data_dir / "backups" / "enc.zip"
    assert stored.read_bytes()[:len(AGE_MAGIC)] == AGE_MAGIC
    assert (server.data_dir / "backups" / "plain.zip").read_bytes()[:2] == b"PK"  # made before: plain
    out = tmp / "enc-decrypted.zip"
    result = age_decrypt(stored, env["k1"], out)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        assert {"data.db", "auxiliary.db", "pb_backup_manifest.json"} <= set(archive.namelist())
    wrong = age_decrypt(stored, env["k2"], tmp / "nope.zip")
    assert wrong.returncode != 0
    # The catalog's info: encrypted, to k1's fingerprint (not its key), and no sealed contents.
    su = login(server)
    info = env["api"].http.get("/api/backups/enc.zip/info", headers=su).json()
    fingerprint = "sha256:" + hashlib.sha256(env["k1"].public.encode()).hexdigest()[:16]
    assert info["encrypted"] is True and info["recipients"] == [fingerprint], info
    assert info["collections"] is None and env["k1"].public not in str(info)
    plain = env["api"].http.get("/api/backups/plain.zip/info", headers=su).json()
    assert plain["encrypted"] is False and "recipients" not in plain and plain["collections"]


def test_an_age_made_zip_uploads_and_restores_in_full_with_the_identity_alone(env: dict[str, Any]) -> None:
    """A plain backup encrypted by the ``age`` tool: uploaded unverified, then a body holding only
    the identity is the full restore (re-exec), which brings its data back."""
    server, api, tmp, k1 = env["server"], env["api"], env["tmp"], env["k1"]
    su = login(server)
    before = notes(api, su)
    made = tmp / "agemade.zip"
    subprocess.run([AGE, "-r", k1.public, "-o", str(made), str(server.data_dir / "backups" / "plain.zip")], check=True)
    response = api.http.post("/api/backups/upload", headers=su, files={"file": ("agemade.zip", made.read_bytes())})
    assert response.status_code == 204, response.text
    add_note(api, su, "after", 3)
    pid = server.process.pid if server.process else None
    last = restore_with(server, "agemade.zip", {"identity": k1.secret})
    assert last["ok"], last
    assert "summary" not in last and "dryRun" not in last  # the full restore, not a dry run
    assert last["verified"] == "sha256+quick_check"
    assert server.process is not None and server.process.pid == pid  # re-exec keeps the process id
    assert sorted(n["title"] for n in notes(api, login(server)).values()) == sorted(n["title"] for n in before.values())
    secrets_absent(server, k1.secret)


def test_backups_from_before_encryption_stay_restorable_without_identity(env: dict[str, Any]) -> None:
    last = restore_with(env["server"], "plain.zip", {"dryRun": True})
    assert last["ok"], last


# --- failures: the three reasons, data untouched -------------------------------------------------


def test_restores_without_right_identity_fail_with_their_reason_and_change_nothing(env: dict[str, Any]) -> None:
    server, k1, k2 = env["server"], env["k1"], env["k2"]
    backups = server.data_dir / "backups"
    raw = bytearray((backups / "enc.zip").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of the payload
    (backups / "tampered.zip").write_bytes(bytes(raw))
    (backups / "cut.zip").write_bytes(bytes(raw[:len(raw) * 3 // 4]))
    before = inodes(server)
    cases = [
        ("enc.zip", None, REQUIRED), ("enc.zip", {"identity": k2.secret}, MISMATCH),
        ("tampered.zip", {"identity": k1.secret}, DAMAGED), ("cut.zip", {"identity": k1.secret}, DAMAGED),
        ("enc.zip", {"dryRun": True}, REQUIRED), ("enc.zip", {"collections": ["notes"]}, REQUIRED),
        ("enc.zip", {"collections": ["notes"], "mode": "replace", "identity": k2.secret}, MISMATCH),
        ("tampered.zip", {"dryRun": True, "identity": k1.secret}, DAMAGED),
    ]
    for key, body, reason in cases:
        last = restore_with(server, key, body)
        assert not last["ok"] and last["error"] == reason, (key, body, last)
    assert inodes(server) == before
    assert not list((server.data_dir / ".pb_temp_to_delete").glob("decrypted_*"))
    logged = wait_for(lambda: server.sql("SELECT data FROM _logs WHERE message = 'Backup restore failed'",
                                         db="auxiliary.db"), "the failures in the logs")
    assert any(MISMATCH in row["data"] for row in logged)
    secrets_absent(server, k1.secret, k2.secret)


def test_a_malformed_identity_is_a_400_that_does_not_echo_it(env: dict[str, Any]) -> None:
    server = env["server"]
    secret = "AGE-SECRET-KEY-1NOTAREALKEYATALL"
    response = httpx.post(server.url + "/api/backups/enc.zip/restore", headers=login(server), timeout=30,
                          json={"identity": secret})
    assert response.status_code == 400
    assert response.json()["data"]["identity"]["code"] == "validation_invalid_identity"
    assert secret not in response.text


def test_dry_run_and_partial_restore_with_the_identity(env: dict[str, Any]) -> None:
    server, k1 = env["server"], env["k1"]
    key_file_text = env["k1"].file.read_text()  # a whole identity file (comments and all) is accepted
    dry = restore_with(server, "enc.zip", {"dryRun": True, "identity": key_file_text})
    assert dry["ok"] and dry["summary"]["dryRun"] is True, dry
    merged = restore_with(server, "enc.zip", {"collections": ["notes"], "identity": k1.secret})
    assert merged["ok"] and "notes" in merged["summary"]["collections"], merged


# --- uploads -------------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "encboundary0123"
    body = io.BytesIO()
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def test_encrypted_uploads_are_checked_with_an_identity_and_refused_when_not_age(env: dict[str, Any]) -> None:
    server, api, k1, k2 = env["server"], env["api"], env["k1"], env["k2"]
    su = login(server)
    encrypted = (server.data_dir / "backups" / "enc.zip").read_bytes()

    def post(parts: list[tuple[str, str | None, bytes]]) -> httpx.Response:
        body, content_type = multipart(parts)
        return api.http.post("/api/backups/upload", headers={**su, "content-type": content_type}, content=body)

    # The identity before the file, then after it: checked either way.
    assert post([("identity", None, k1.secret.encode()), ("file", "up1.zip", encrypted)]).status_code == 204
    assert post([("file", "up2.zip", encrypted), ("identity", None, k1.secret.encode())]).status_code == 204
    wrong = post([("file", "up3.zip", encrypted), ("identity", None, k2.secret.encode())])
    assert wrong.status_code == 400 and MISMATCH in wrong.json()["data"]["file"]["message"], wrong.text
    raw = bytearray(encrypted)
    raw[len(raw) // 2] ^= 0x01
    tampered = post([("identity", None, k1.secret.encode()), ("file", "up4.zip", bytes(raw))])
    assert tampered.status_code == 400 and DAMAGED in tampered.json()["data"]["file"]["message"]
    # Without an identity a tampered payload is accepted unverified (its restore checks it)...
    assert post([("file", "up5.zip", bytes(raw))]).status_code == 204
    # ...but not a header that is not age.
    broken = post([("file", "up6.zip", AGE_MAGIC + b"-> nonsense\n" + os.urandom(200))])
    assert broken.status_code == 400 and broken.json()["data"]["file"]["code"] == "validation_invalid_backup"
    listed = {b["key"] for b in api.http.get("/api/backups", headers=su).json()}
    assert {"up1.zip", "up2.zip", "up5.zip"} <= listed and not {"up3.zip", "up4.zip", "up6.zip"} & listed
    assert not list((server.data_dir / ".pb_temp_to_delete").glob("upload_*"))
    info = api.http.get("/api/backups/up1.zip/info", headers=su).json()
    assert info["encrypted"] is True and info["recipients"] is None  # an age header does not name them
    assert info["createdBy"]["kind"] == "upload"
    secrets_absent(server, k1.secret, k2.secret)


# --- safety copies, scheduled backups, key rotation ---------------------------------------------


def safety_copies(server: ServerProcess) -> set[str]:
    return {p.name for p in (server.data_dir / "backups").glob("@pre_restore_*.zip")}


def test_the_safety_copy_of_a_full_restore_is_encrypted(env: dict[str, Any]) -> None:
    """Encrypted while either side has recipients: the data replaced (k1 set, restoring data
    whose settings have none), then the other way round (replaced data without, restored with)."""
    server, k1, tmp = env["server"], env["k1"], env["tmp"]
    set_recipients(server, [k1.public])
    for key in ("plain.zip", "enc.zip"):
        before = safety_copies(server)
        assert restore_with(server, key, {"identity": k1.secret} if key == "enc.zip" else None)["ok"]
        copy = wait_for(lambda: safety_copies(server) - before, "the safety copy").pop()
        wait_idle(server)
        path = server.data_dir / "backups" / copy
        assert path.read_bytes()[:len(AGE_MAGIC)] == AGE_MAGIC, key
        assert age_decrypt(path, k1, tmp / f"safety-{key}").returncode == 0
        assert zipfile.ZipFile(tmp / f"safety-{key}").testzip() is None
    shown = httpx.get(server.url + "/api/settings", headers=login(server), timeout=30).json()
    assert shown["backups"]["encryption"]["recipients"] == [k1.public]  # enc.zip's settings


def test_key_rotation_and_scheduled_backups(env: dict[str, Any]) -> None:
    """New recipients apply to new backups (the scheduled one too); old backups keep their old key."""
    server, k1, k2 = env["server"], env["k1"], env["k2"]
    su = login(server)
    set_recipients(server, [k2.public])
    backup(server, "rotated.zip")
    assert not restore_with(server, "rotated.zip", {"dryRun": True, "identity": k1.secret})["ok"]
    assert restore_with(server, "rotated.zip", {"dryRun": True, "identity": k2.secret})["ok"]
    assert restore_with(server, "enc.zip", {"dryRun": True, "identity": k2.secret})["error"] == MISMATCH
    assert restore_with(server, "enc.zip", {"dryRun": True, "identity": k1.secret})["ok"]
    assert httpx.patch(server.url + "/api/settings", headers=su, timeout=30,
                       json={"backups": {"cron": "0 3 * * *"}}).status_code == 200
    assert httpx.post(server.url + "/api/crons/__pbAutoBackup__", headers=su, timeout=30).status_code == 204
    scheduled = wait_for(lambda: next(iter((server.data_dir / "backups").glob("@auto_pb_backup_*.zip")), None),
                         "the scheduled backup")
    wait_idle(server)
    assert scheduled.read_bytes()[:len(AGE_MAGIC)] == AGE_MAGIC
    assert age_decrypt(scheduled, k2, env["tmp"] / "auto.zip").returncode == 0
    set_recipients(server, [env["k1"].public])


# --- S3 ------------------------------------------------------------------------------------------


def test_encrypted_backups_on_s3(env: dict[str, Any], s3_server: S3Server) -> None:
    server, k1 = env["server"], env["k1"]
    su = login(server)
    bucket = s3_server.bucket()
    assert httpx.patch(server.url + "/api/settings", headers=su, timeout=30,
                       json={"backups": {"s3": s3_server.settings(bucket)}}).status_code == 200
    try:
        backup_response = httpx.post(server.url + "/api/backups", headers=su, json={"name": "s3enc.zip"}, timeout=30)
        assert backup_response.status_code == 204
        assert wait_idle(server)["ok"]
        body = s3_server.client().get_object(Bucket=bucket, Key="s3enc.zip")["Body"].read()
        assert body[:len(AGE_MAGIC)] == AGE_MAGIC
        assert restore_with(server, "s3enc.zip", {"dryRun": True})["error"] == REQUIRED
        assert restore_with(server, "s3enc.zip", {"dryRun": True, "identity": k1.secret})["ok"]
    finally:
        assert httpx.patch(server.url + "/api/settings", headers=su, timeout=30,
                           json={"backups": {"s3": {"enabled": False}}}).status_code == 200
    secrets_absent(server, k1.secret, S3Server.SECRET)


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_verify_and_restore_take_an_identity_file(env: dict[str, Any]) -> None:
    server, tmp, k1, k2 = env["server"], env["tmp"], env["k1"], env["k2"]
    verify = run_cli("backup", "verify", "enc.zip", "--quick", data_dir=server.data_dir, check=False)
    assert verify.returncode == 1 and REQUIRED in verify.stderr and "--identity-file" in verify.stderr
    verify = run_cli("backup", "verify", "enc.zip", "--quick", "--identity-file", str(k2.file),
                     data_dir=server.data_dir, check=False)
    assert verify.returncode == 1 and MISMATCH in verify.stderr
    verify = run_cli("backup", "verify", "enc.zip", "--identity-file", str(k1.file), data_dir=server.data_dir)
    assert "is a valid backup: encrypted (age)" in verify.stdout
    # A restore needs the data directory to itself: another one, holding the encrypted backup.
    other = tmp / "cli_data"
    run_cli("superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD, data_dir=other)
    (other / "backups").mkdir(exist_ok=True)
    shutil.copy(server.data_dir / "backups" / "enc.zip", other / "backups" / "enc.zip")
    before = {name: (other / name).stat().st_ino for name in ("data.db", "auxiliary.db")}
    for extra, reason in (((), REQUIRED), (("--identity-file", str(k2.file)), MISMATCH),
                          (("--dry-run", "--identity-file", str(k2.file)), MISMATCH)):
        result = run_cli("backup", "restore", "enc.zip", *extra, data_dir=other, check=False)
        assert result.returncode == 1 and reason in result.stderr, result.stderr
    assert {name: (other / name).stat().st_ino for name in ("data.db", "auxiliary.db")} == before
    result = run_cli("backup", "restore", "enc.zip", "--identity-file", str(k1.file), data_dir=other)
    assert "Restored enc.zip" in result.stdout
    restored = [row["title"] for row in ServerProcess(other).sql("SELECT title FROM notes ORDER BY n")]
    assert restored[:2] == ["one", "two"]
    for text in (verify.stdout, verify.stderr, result.stdout, result.stderr):
        assert k1.secret not in text and k2.secret not in text


# --- a full disk while encrypting or decrypting --------------------------------------------------


def test_a_file_size_limit_fails_encrypted_backup_and_decryption_cleanly(tmp_path: Path) -> None:
    """The storage writer fails on the encrypting thread (EFBIG past ``RLIMIT_FSIZE``), and the
    decrypted temp zip of a restore does not fit: clear reasons, nothing left, data untouched."""
    from test_disk_full import FSIZE_LIMIT, MB, LimitedServer, assert_clear, incompressible, upsert_superuser

    key = Key(tmp_path, "k")
    data_dir = tmp_path / "pb_data"
    upsert_superuser(data_dir)
    server = LimitedServer(data_dir, fsize=FSIZE_LIMIT)
    server.start()
    try:
        set_recipients(server, [key.public])
        api = Api(server)
        collection = make_notes(api, login(server))
        incompressible(data_dir / "storage" / collection["id"] / "big", 1, 3 * MB)
        response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": "big.zip"}, timeout=30)
        assert response.status_code == 204
        last = wait_idle(server)
        assert last["key"] == "big.zip" and not last["ok"], last
        assert_clear(last["error"], server, "space", "disk")
        assert sorted(p.name for p in (data_dir / "backups").iterdir()) == []
        # An encrypted backup bigger than the limit, put there by someone else: its decryption fails.
        plain = tmp_path / "plain.zip"
        with zipfile.ZipFile(plain, "w") as archive:
            archive.writestr("data.db", (data_dir / "data.db").read_bytes())
            archive.writestr("blob.bin", os.urandom(3 * MB))
        subprocess.run([AGE, "-r", key.public, "-o", str(data_dir / "backups" / "huge.zip"), str(plain)], check=True)
        before = inodes(server)
        last = restore_with(server, "huge.zip", {"identity": key.secret})
        assert not last["ok"], last
        assert_clear(last["error"], server, "space", "disk")
        assert inodes(server) == before
        temp = data_dir / ".pb_temp_to_delete"
        assert [p for p in temp.rglob("*") if p.is_file()] == []
        api.close()

        # A failure on the zip side while the encrypting thread runs (a listed file turned into a
        # directory while the job waits at a gate): nothing published, nothing left, and the next
        # encrypted backup works (no thread or pipe left stuck).
        gate = tmp_path / "gate"
        gate.write_text("1")  # data.db goes in, then the job waits before auxiliary.db
        server.stop()
        server.fsize = None
        server.env.update(PB_FAULTS="gate:backup-write", PB_FAULTS_GATE=str(gate))
        server.start()
        response = httpx.post(server.url + "/api/backups", headers=login(server), json={"name": "cut.zip"}, timeout=30)
        assert response.status_code == 204
        wait_gate_held(gate)
        blob = next((data_dir / "storage").rglob("blob_0.bin"))
        blob.unlink()
        blob.mkdir()
        gate.unlink()
        last = wait_idle(server)
        assert last["key"] == "cut.zip" and not last["ok"], last
        assert sorted(p.name for p in (data_dir / "backups").iterdir()) == ["huge.zip"]
        assert [p for p in temp.rglob("*") if p.is_file()] == []
        blob.rmdir()
        backup(server, "after.zip")
        assert age_decrypt(data_dir / "backups" / "after.zip", key, tmp_path / "after.zip").returncode == 0
    finally:
        server.stop()
