"""The official JS SDK (npm `pocketbase`) drives our server, and the same script drives PocketBase
0.40.6: both must give the same answers, except where we deliberately differ (listed below)."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import SUPERUSER_EMAIL, SUPERUSER_PASSWORD, ServerProcess

E2E = Path(__file__).resolve().parent / "e2e"
EXPECTED = json.loads((E2E / "pocketbase-0.40.6.expected.json").read_text())

# ours: a protected file needs a valid file token even when the view rule is "" (PocketBase
# serves it to anyone then, which defeats the point of marking the field protected).
OUR_DIFFERENCES = {("protectedFile", "withoutTokenStatus"): (200, 404)}


def run_flow(url: str) -> dict[str, Any]:
    result = subprocess.run(
        ["node", "sdk_flow.mjs", url, SUPERUSER_EMAIL, SUPERUSER_PASSWORD],
        cwd=E2E, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"sdk_flow failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def test_sdk_flow_against_our_server(server: ServerProcess) -> None:
    ours = run_flow(server.url)
    assert ours["auth"] == {"isValid": True, "isSuperuser": True, "email": SUPERUSER_EMAIL,
                            "collectionName": "_superusers"}
    assert ours["protectedFile"]["withTokenBody"] == "hello world\n"
    expected = copy.deepcopy(EXPECTED)
    for (section, key), (_, our_value) in OUR_DIFFERENCES.items():
        expected[section][key] = our_value
    assert ours == expected


def test_sdk_flow_against_pocketbase_matches_the_recorded_answers(pocketbase: str) -> None:
    reference = run_flow(pocketbase)
    assert reference == EXPECTED
    for (section, key), (their_value, _) in OUR_DIFFERENCES.items():
        assert reference[section][key] == their_value


