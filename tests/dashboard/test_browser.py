"""The dashboard in headless Chromium (Debian's chromium, chromium-driver,
python3-selenium): the overview loads and its chart draws from live
updates; a running job's output streams into its page; a dead job shows its
attempts and is retried from the page; a read-only dashboard has no buttons;
a page of another origin cannot make an admin dashboard act; keyboard and
phone width. Screenshots of each page go to $KELPIE_SCREENSHOTS (ctest sets
it to the build tree's dashboard-screenshots/), else the test's tmp dir."""
import http.server
import os
import shutil
import threading

import pytest

import kelpie
from conftest import spec, wait_for

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
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
    return wait_for(lambda: pred(drv), timeout, what)


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
