"""The dashboard under abuse: query strings no form sends, viewers that stop
reading a live view, a broker that is stopped or killed under it. Against a
real dashboard process and a real kelpied (conftest.py); every wait bounded."""

import pytest


@pytest.mark.parametrize("path", [
    # Not ASCII digits: int() reads "²" as an error and "٣" as 3.
    "/api/jobs?limit=%C2%B2",
    "/api/jobs?limit=%D9%A3",
    "/dlq?limit=%C2%B2",
    # More digits than int() converts (4,300): was blamed on the broker (502).
    "/api/jobs?limit=" + "9" * 5000,
    "/api/jobs?since=%D9%A3",
    "/api/jobs?until=1" + "0" * 5000,
    # A zone offset no browser gives, or one that takes a date out of range:
    # OverflowError, answered 500 "Server got itself in trouble".
    "/api/jobs?since=2026-01-01&tz=99999999999999",
    "/jobs?since=2026-01-01&tz=99999999999999999",
    "/api/jobs?since=9999-12-31T23:59&tz=1440",
    "/api/jobs?since=0001-01-01&tz=-1440",
    "/dlq?until=0001-01-01T00:00&tz=60",
    "/api/jobs?since=2026-01-01&tz=%D9%A3",
    "/api/jobs?since=2026-01-01&tz=1441",
], ids=lambda p: p if len(p) < 80 else p[:40] + f"...({len(p)} chars)")
def test_filters_no_form_sends_are_a_bad_request(dashboard, path):
    r = dashboard.get(path)
    assert r.status == 400, (path, r.status, r.body[:300])
    assert b"Traceback" not in r.body
    assert "Error handling request" not in dashboard.log()


def test_filters_a_browser_sends_still_work(dashboard):
    # The bounds above are wider than any zone: getTimezoneOffset is within
    # -840 (UTC+14) and +720 (UTC-12).
    for path in ("/api/jobs?since=2026-01-01T00:00&tz=-840", "/api/jobs?until=2026-01-01&tz=720",
                 "/api/jobs?since=0&until=99999999999999&limit=1000",
                 "/api/jobs?since=9999-12-31T23:59&tz=-60"):
        r = dashboard.get(path)
        assert r.status == 200, (path, r.status, r.body[:300])
        assert r.json()["jobs"] == []
