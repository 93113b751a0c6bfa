"""The dashboard in headless Chromium (Debian's chromium, chromium-driver,
python3-selenium): the overview loads and its chart draws from live
updates; a running job's output streams into its page; a dead job shows its
attempts and is retried from the page; a read-only dashboard has no buttons;
a page of another origin cannot make an admin dashboard act; keyboard and
phone width. Screenshots of each page go to $KELPIE_SCREENSHOTS (ctest sets
it to the build tree's dashboard-screenshots/), else the test's tmp dir."""
import datetime
import http.server
import os
import shutil
import threading
import time

import pytest

import kelpie
from conftest import spec, wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not os.path.exists(CHROMEDRIVER):
    pytest.skip("chromium-driver is not installed", allow_module_level=True)


@pytest.fixture(params=["asyncio"])
def loop(request):
    # The browser tests exercise the pages, not the event loop (the API
    # tests run both); one loop keeps Chromium's time on a 2-core box down.
    return request.param


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER)
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(20)
    yield drv
    drv.quit()


@pytest.fixture
def shots(tmp_path, request):
    where = os.environ.get("KELPIE_SCREENSHOTS") or str(tmp_path / "screenshots")
    os.makedirs(where, exist_ok=True)

    def shot(drv, name):
        drv.save_screenshot(os.path.join(where, f"{name}.png"))
    return shot


def until(drv, pred, timeout=15.0, what="condition"):
    """pred(drv) true within timeout. A renderer that does not answer one
    call in time (a loaded machine) is asked again; the last error is kept
    in the failure."""
    errors = []

    def check():
        try:
            return pred(drv)
        except TimeoutException as exc:
            errors.append(exc)
            return None
    try:
        return wait_for(check, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (last renderer error: {errors[-1:]})") from None


def test_overview_loads_and_chart_draws(client, workers, dashboard, browser, shots):
    workers.start("w1", queues=("q",))
    client.wait_state(client.submit(spec(x=0)), ("succeeded",))
    browser.get(f"http://{dashboard.host}/")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
    assert "/jobs?queue=q" in browser.page_source
    until(browser, lambda d: d.execute_script(
        "return document.getElementById('rates').dataset.drawn === '1'"), what="chart made")
    for i in range(1, 4):
        client.wait_state(client.submit(spec(x=i)), ("succeeded",))
    # Live counters (SSE) reach the page without a reload, and the chart
    # gets points from them.
    until(browser, lambda d: int(d.find_element(
        By.CSS_SELECTOR, '[data-stat="counters.jobs_succeeded"]').text) >= 4,
        what="live counter")
    until(browser, lambda d: d.execute_script(
        "var c = Chart.getChart('rates'); return c && c.data.labels.length >= 2 && "
        "c.data.datasets[1].data.some(function (v) { return v > 0; });"), what="chart points")
    assert not browser.find_elements(By.CSS_SELECTOR, ".nojs:not([hidden])")[0].is_displayed()
    # A queue that appears after the page loaded shows up in its table.
    workers.start("w2", queues=("later",))
    until(browser, lambda d: d.find_elements(
        By.CSS_SELECTOR, '#live-queues a[href="/jobs?queue=later"]'), what="live queue row")
    shots(browser, "overview")
    for path, name in (("/queues", "queues"), ("/workers", "workers"), ("/jobs", "jobs")):
        browser.get(f"http://{dashboard.host}{path}")
        assert browser.find_element(By.TAG_NAME, "h1").text.lower().startswith(name[:4])
        shots(browser, name)


def test_live_output_streams_into_the_job_page(client, workers, dashboard, browser, shots):
    workers.start("w1", queues=("q",))
    browser.get(f"http://{dashboard.host}/jobs")  # a fresh Chromium's first load is slow
    job = client.submit(spec(out="streamed line", sleep=6))
    client.wait_state(job, ("leased",))
    browser.get(f"http://{dashboard.host}/jobs/{job}")
    # The page is loaded while the job still runs (its event stream does
    # not hold the page's load event).
    assert client.job(job)["state"] == "leased"
    if hasattr(kelpie.Client, "submit"):
        # WATCH with STREAM: the output is on the page while the job runs.
        until(browser, lambda d: "streamed line" in d.find_element(By.ID, "output").text,
              what="live output")
        assert client.job(job)["state"] == "leased"
        assert float(browser.find_element(By.ID, "progress").get_attribute("value")) == 0.5
        shots(browser, "job-running")
    # At its end the page shows the finished job: history, result, output tail.
    until(browser, lambda d: "outcome-succeeded" in d.page_source, timeout=20,
          what="finished job's page")
    assert "streamed line" in browser.find_element(By.ID, "output").text
    time_el = browser.find_element(By.CSS_SELECTOR, ".facts time")
    assert time_el.get_attribute("title").endswith("UTC")  # local time shown, UTC on hover
    shots(browser, "job")


def test_dead_job_shows_attempts_and_is_retried_from_the_page(client, workers, admin_dashboard,
                                                              browser, shots):
    d = admin_dashboard
    workers.start("w1", queues=("q",))
    job = client.submit(spec(fail="always"), max_attempts=2, backoff_ms=50)
    client.wait_state(job, ("dead",))
    browser.get(f"http://{d.host}/dlq")
    assert job in browser.page_source
    shots(browser, "dlq")
    browser.get(f"http://{d.host}/jobs/{job}")
    rows = browser.find_elements(By.CSS_SELECTOR, "section table tbody tr")
    assert len(rows) == 2 and all("failed" in r.text for r in rows)
    browser.get(f"http://{d.host}/dlq")
    browser.find_element(By.XPATH, f"//tr[contains(., '{job}')]//button[text()='Retry']").click()
    until(browser, lambda b: b.current_url.endswith("/dlq"), what="back on the DLQ page")
    # Retried: two more attempts (fresh allowance), history kept.
    rec = wait_for(lambda: (lambda j: j if len(j["history"]) == 4 and j["state"] == "dead"
                            else None)(client.job(job)), what="retried and dead again")
    assert [a["outcome"] for a in rec["history"]] == ["failed"] * 4


def test_read_only_has_no_buttons(client, workers, dashboard, browser):
    workers.start("w1", queues=("q",))
    job = client.submit(spec(fail="x"), max_attempts=1)
    client.wait_state(job, ("dead",))
    for path in ("/", "/dlq", f"/jobs/{job}", "/jobs"):
        browser.get(f"http://{dashboard.host}{path}")
        assert not browser.find_elements(By.CSS_SELECTOR, "form[method=post], button[type=submit]"
                                         ":not(form.filter button)"), path


@pytest.fixture
def evil_site():
    """A page on another origin that posts a form to the dashboard on load."""
    pages = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, pages
    server.shutdown()
    server.server_close()


def test_another_origin_cannot_act(client, workers, admin_dashboard, browser, evil_site):
    d = admin_dashboard
    server, pages = evil_site
    workers.start("w1", queues=("q",))
    job = client.submit(spec(fail="x"), max_attempts=1)
    client.wait_state(job, ("dead",))
    pages["/"] = (f'<form id="f" method="post" action="http://{d.host}/api/dlq/purge">'
                  f'<input name="csrf" value="guessed"></form>'
                  "<script>document.getElementById('f').submit()</script>")
    browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
    until(browser, lambda b: "/api/dlq/purge" in b.current_url, what="the forged POST sent")
    assert "cross-site" in browser.page_source or "403" in browser.page_source
    assert client.job(job)["state"] == "dead"


def test_keyboard_and_phone_width(client, workers, admin_dashboard, browser, shots):
    d = admin_dashboard
    workers.start("w1", queues=("q",))
    job = client.submit(spec(fail="x"), max_attempts=1)
    client.wait_state(job, ("dead",))
    browser.set_window_size(390, 844)
    for path in ("/", "/queues", "/workers", "/jobs", "/dlq", f"/jobs/{job}"):
        browser.get(f"http://{d.host}{path}")
        # Nothing wider than the phone but the tables' own scroll boxes.
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1"), path
    shots(browser, "job-phone")
    browser.set_window_size(1280, 900)
    browser.get(f"http://{d.host}/dlq")
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)
    first = browser.switch_to.active_element
    assert first.text == "Skip to content" and first.is_displayed()
    # Tab reaches the nav links, then the job's link and its buttons.
    seen = []
    for _ in range(30):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        el = browser.switch_to.active_element
        seen.append((el.tag_name, el.text))
    assert ("a", "Queues") in seen and ("a", job) in seen and ("button", "Retry") in seen


@pytest.fixture
def browser_in_zone(tmp_path):
    """Chromium whose local time zone is UTC+05:30 (no DST), to tell local
    times from UTC ones."""
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-tz'}"):
        opts.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, env={**os.environ, "TZ": "Asia/Kolkata"})
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_page_load_timeout(20)
    yield drv
    drv.quit()


def test_queue_charts_draw_per_queue(client, workers, dashboard, browser, shots):
    workers.start("w1", queues=("emails", "reports"))
    browser.get(f"http://{dashboard.host}/")
    until(browser, lambda d: d.execute_script(
        "return document.getElementById('rates').dataset.drawn === '1'"), what="chart made")
    for i in range(4):
        client.submit(spec(x=i), queue="emails")
    bad = client.submit(spec(fail="smtp down"), queue="reports", max_attempts=1)
    client.wait_state(bad, ("dead",))
    # One chart per queue, each fed with that queue's own rates.
    until(browser, lambda d: d.execute_script(
        "var c = document.querySelector('#queue-charts canvas[data-queue=\"emails\"]');"
        "var ch = c && Chart.getChart(c);"
        "return ch && ch.data.datasets[1].data.some(function (v) { return v > 0; });"),
        what="the emails chart shows successes")
    until(browser, lambda d: d.execute_script(
        "var c = document.querySelector('#queue-charts canvas[data-queue=\"reports\"]');"
        "var ch = c && Chart.getChart(c);"
        "return ch && ch.data.datasets[3].data.some(function (v) { return v > 0; }) &&"
        " ch.data.datasets[1].data.every(function (v) { return v === 0; });"),
        what="the reports chart shows a dead job and no success")
    assert browser.execute_script(
        "return Array.from(document.querySelectorAll('#queue-charts canvas'))"
        ".map(function (c) { return c.dataset.queue; })") == ["emails", "reports"]
    # The table's rate columns are there without JavaScript too (server-rendered).
    assert "succeeded/s" in browser.find_element(By.ID, "live-queues").text
    browser.set_window_size(1280, 1500)
    shots(browser, "overview-queues")
    browser.set_window_size(390, 844)
    browser.get(f"http://{dashboard.host}/")
    # A queue's chart comes with its activity in the last minute of samples
    # (the test may have taken longer): a little more of it.
    client.wait_state(client.submit(spec(x=9), queue="emails"), ("succeeded",))
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#queue-charts canvas"),
          what="queue charts at a phone's width")
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1")
    browser.execute_script("document.getElementById('h-queues').scrollIntoView()")
    shots(browser, "overview-phone")


def test_queues_and_workers_pages(client, workers, dashboard, browser, shots):
    workers.start("thumbnailer", credits=4, queues=("thumbs",))
    for prio in (0, 0, 3, 9):
        client.submit(spec(x=prio), queue="backlog", priority=prio)
    client.submit(spec(x=1), queue="backlog", delay_ms=600_000)
    dead = client.submit(spec(fail="bad image"), queue="thumbs", max_attempts=1)
    client.wait_state(dead, ("dead",))
    browser.get(f"http://{dashboard.host}/queues")
    row = browser.find_element(By.XPATH, "//tr[td/a[text()='backlog']]")
    cells = [td.text.replace("\u00a0", " ") for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1:4] == ["4", "p9 1 · p3 1 · p0 2", "1"], cells
    shots(browser, "queues")
    browser.get(f"http://{dashboard.host}/workers")
    row = browser.find_element(By.XPATH, "//tr[td[contains(., 'thumbnailer')]]")
    text = row.text
    assert "jobs:thumbs" in text and " ago" in text
    shots(browser, "workers")


def test_local_times_and_search_in_the_viewers_zone(client, workers, dashboard, browser_in_zone,
                                                    shots):
    b = browser_in_zone
    workers.start("w1", queues=("q",))
    first = client.submit(spec(x=1), idempotency_key="invoice-7")
    client.wait_state(first, ("succeeded",))
    created = client.job(first)["created_at"]
    time.sleep(1.1)  # the form's times have whole seconds
    second = client.submit(spec(x=2))
    client.wait_state(second, ("succeeded",))
    b.get(f"http://{dashboard.host}/jobs")
    # Shown in the viewer's zone (UTC+05:30), UTC on hover.
    t = b.find_element(By.CSS_SELECTOR, "tbody time")
    utc = datetime.datetime.fromtimestamp(created / 1000, datetime.timezone.utc)
    local = utc + datetime.timedelta(hours=5, minutes=30)
    assert t.get_attribute("title") == utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert local.strftime("%H:%M:%S").lstrip("0") in t.text or local.strftime("%-I:%M:%S") in t.text
    assert "UTC+05:30" in b.find_element(By.CSS_SELECTOR, "[data-tz-hint]").text
    # Created before a local time just after the first job: only the first.
    cut = (local + datetime.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    b.execute_script("document.querySelector('input[name=until]').value = arguments[0];", cut)
    b.find_element(By.XPATH, "//form[@aria-label='Filter jobs']//button").click()
    until(b, lambda d: "until=" in d.current_url, what="filtered")
    assert "tz=-330" in b.current_url
    links = [a.text for a in b.find_elements(By.CSS_SELECTOR, "tbody a[href^='/jobs/']")]
    assert links == [first], links
    # A datetime-local input gives its value normalized: no ":00" seconds.
    normalized = cut[:-3] if cut.endswith(":00") else cut
    assert b.find_element(By.CSS_SELECTOR, "input[name=until]").get_attribute("value") \
        == normalized
    # By idempotency key, from the keyboard: Tab to the field, type, Enter.
    b.get(f"http://{dashboard.host}/jobs")
    field = None
    for _ in range(40):
        b.switch_to.active_element.send_keys(Keys.TAB)
        el = b.switch_to.active_element
        if el.get_attribute("name") == "key":
            field = el
            break
    assert field is not None, "Tab reaches the key field"
    field.send_keys("invoice-7", Keys.ENTER)
    until(b, lambda d: "key=invoice-7" in d.current_url, what="searched by key")
    links = [a.text for a in b.find_elements(By.CSS_SELECTOR, "tbody a[href^='/jobs/']")]
    assert links == [first], links
    shots(b, "jobs-search")


def test_several_brokers_overview(tmp_path, loop, browser, shots):
    from conftest import Dashboard, support
    from kelpie.testing import Kelpied
    for sub in ("one", "two"):
        os.makedirs(tmp_path / sub)
    one = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path / "one")).start(retries=2)
    two = Kelpied(heartbeat_ms=200, log_dir=str(tmp_path / "two")).start(retries=2)
    w1, w2 = support.Workers(tmp_path / "one", one), support.Workers(tmp_path / "two", two)
    c1 = support.Client(one.frontend)
    d = Dashboard(tmp_path, f"{one.frontend},{two.frontend}", False, loop)
    try:
        w1.start("alpha", queues=("q",))
        w2.start("beta", queues=("q",))
        c1.wait_state(c1.submit(spec(x=1)), ("succeeded",))
        browser.get(f"http://{d.host}/")
        assert "2 of 2 brokers healthy" in browser.page_source
        rows = browser.find_elements(By.CSS_SELECTOR, "section[aria-labelledby=h-brokers] tbody tr")
        assert [r.find_element(By.TAG_NAME, "code").text for r in rows] == [one.frontend,
                                                                            two.frontend]
        shots(browser, "brokers")
        browser.get(f"http://{d.host}/workers")
        assert one.frontend in browser.page_source and two.frontend in browser.page_source
    finally:
        d.stop()
        w1.kill_all()
        w2.kill_all()
        c1.close()
        one.stop()
        two.stop()
