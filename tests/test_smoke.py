from conftest import Api


def test_health_and_superuser_login(api: Api, su: dict[str, str]) -> None:
    assert api.http.get("/api/health").json() == {"message": "API is healthy.", "code": 200, "data": {}}
    data = api.http.get("/api/health", headers=su).json()["data"]
    assert data["canBackup"] is True and data["realIP"] == "127.0.0.1"
