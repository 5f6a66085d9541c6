"""The live dashboard end to end in headless Chromium (Debian chromium + chromedriver, driven by selenium)."""

import shutil

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from cc_tasks.models import TaskOptions, TaskStatus

from .test_http import TOKEN, http_server  # noqa: F401  (fixture)
from .test_manager import fake, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    if not shutil.which(CHROMIUM) or not shutil.which(CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are missing: run scripts/bootstrap.sh (installs Debian's packages)")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--window-size=1400,900",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def row_status(driver, task_id: str) -> str | None:
    """The status shown in the task's row (rows are re-rendered every second: a stale read is retried)."""
    try:
        cells = driver.find_elements(By.CSS_SELECTOR, f'tr[data-task-id="{task_id}"] td.status')
        return cells[0].text if cells else None
    except StaleElementReferenceException:
        return None


def click(wait, css: str) -> None:
    """Click an element that the page may be re-rendering right now."""

    def attempt(d):
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False

    wait.until(attempt)


def test_dashboard_live_updates_and_cancel(http_server, browser, fake_manager, workdir, tmp_path):  # noqa: F811
    base = http_server.base
    browser.get(base + "/")
    assert "unauthorized" in browser.find_element(By.TAG_NAME, "body").text
    assert "cc-tasks" not in browser.title

    quick = fake_manager.start(
        TaskOptions(prompt=fake({"sleep": 3, "result": "finished-in-browser"}), cwd=str(workdir), name="quick one")
    )
    browser.get(base + f"/?token={TOKEN}")
    assert browser.current_url == base + "/"  # the token left the URL; a cookie carries it now
    wait = WebDriverWait(browser, 40, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: row_status(d, quick.task_id) == "running")
    wait.until(lambda d: row_status(d, quick.task_id) == "completed")  # changes live, without a reload

    click(wait, f'tr[data-task-id="{quick.task_id}"]')
    wait.until(lambda d: "finished-in-browser" in d.find_element(By.ID, "result").text)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#transcript .entry.tool"))
    assert "Bash" in browser.find_element(By.ID, "transcript").text

    slow = fake_manager.start(TaskOptions(prompt=fake({"sleep": 300}), cwd=str(workdir), name="slow one"))
    wait.until(lambda d: row_status(d, slow.task_id) == "running")
    claude_pid = wait_until(lambda: (r := fake_manager.get(slow.task_id)).claude and r.claude.pid)
    click(wait, f'tr[data-task-id="{slow.task_id}"]')
    click(wait, "#cancel")
    wait.until(lambda d: row_status(d, slow.task_id) == "cancelled")
    wait.until(lambda d: d.find_element(By.ID, "detail-status").text == "cancelled")
    assert "cancelled: the task's process tree was stopped" in browser.find_element(By.ID, "detail").text
    assert fake_manager.get(slow.task_id).status == TaskStatus.CANCELLED
    from .conftest import pid_alive

    assert not pid_alive(claude_pid)
    browser.save_screenshot(str(tmp_path / "dashboard.png"))
    assert not browser.find_elements(By.ID, "cancel")  # nothing left to cancel


def test_dashboard_shows_agent_tasks_with_their_holder_and_the_groups_notes(http_server, browser, fake_manager):  # noqa: F811
    from cc_tasks.models import PostOptions

    t = fake_manager.post(PostOptions(prompt="review the plan", name="agent job", group="crew"))
    fake_manager.claim("window-7", lease_seconds=600)
    fake_manager.add_note("crew", "the API moved to /v2", key="api", by="window-7")
    browser.get(http_server.base + f"/?token={TOKEN}")
    wait = WebDriverWait(browser, 40, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: row_status(d, t.task_id) == "running")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-task-id="{t.task_id}"] td.runner').text
    assert "agent: window-7 until" in row and "crew" in row
    click(wait, f'tr[data-task-id="{t.task_id}"]')
    wait.until(lambda d: "window-7" in d.find_element(By.ID, "holder").text)
    assert "lease until" in browser.find_element(By.ID, "holder").text
    wait.until(lambda d: "the API moved to /v2" in d.find_element(By.ID, "notes").text)


def test_dashboard_shows_a_worktree_tasks_changes(http_server, browser, fake_manager, tmp_path):  # noqa: F811
    import json

    from .test_http import http
    from .test_worktrees import make_repo

    repo = make_repo(tmp_path / "repo")
    cfg = {"files": {"one.txt": "1\n", "two.txt": "2\n2\n"}, "commit": "two files"}
    t = fake_manager.start(TaskOptions(prompt=fake(cfg), cwd=str(repo), worktree=True, name="in a worktree"))
    wait_until(lambda: fake_manager.get(t.task_id).status == TaskStatus.COMPLETED)
    status, _, body = http(http_server.base + f"/api/tasks/{t.task_id}", headers={"Authorization": f"Bearer {TOKEN}"})
    record = json.loads(body)
    assert status == 200 and record["changes"]["files_changed"] == 2 and record["worktree"]["name"] == t.task_id
    browser.get(http_server.base + f"/?token={TOKEN}")
    wait = WebDriverWait(browser, 40, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    wait.until(lambda d: row_status(d, t.task_id) == "completed")
    click(wait, f'tr[data-task-id="{t.task_id}"]')
    wait.until(lambda d: d.find_elements(By.ID, "changes"))
    shown = browser.find_element(By.ID, "changes").text
    assert "2 files changed, +3 -0 · 1 commit" in shown and "one.txt +1 -0" in shown and "two.txt +2 -0" in shown
    assert f"worktree-{t.task_id}" in browser.find_element(By.ID, "detail").text


def test_needs_you_shows_a_pending_request_and_its_buttons_answer_it(http_server, browser, manager, workdir, tmp_path):  # noqa: F811
    from selenium.webdriver.common.keys import Keys

    from .conftest import mock_prompt
    from .test_approvals import STEPS, asking

    allowed_dir, denied_dir = workdir / "allowed", workdir / "denied"
    allowed_dir.mkdir()
    denied_dir.mkdir()
    allowed = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(allowed_dir), name="asks to echo"))
    denied = manager.start(TaskOptions(prompt=mock_prompt(STEPS), cwd=str(denied_dir), name="asks again"))
    to_allow, to_deny = asking(manager, allowed.task_id), asking(manager, denied.task_id)
    browser.get(http_server.base + f"/?token={TOKEN}")
    wait = WebDriverWait(browser, 40, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException])
    entry = f'.approval[data-request-id="{to_allow.request_id}"]'
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, entry))
    shown = browser.find_element(By.CSS_SELECTOR, entry).text
    assert "Bash" in shown and "echo hi > out.txt" in shown and "asks to echo" in shown
    assert allowed.task_id in shown and to_allow.request_id in shown and "expires" in shown and "(in " in shown
    assert "Needs you (2)" in browser.find_element(By.ID, "needs").text
    assert "2 requests need you" in browser.find_element(By.ID, "summary").text
    assert not (allowed_dir / "out.txt").exists()
    browser.save_screenshot(str(tmp_path / "needs-you.png"))

    click(wait, f"{entry} button.allow")
    wait.until(lambda d: "allowed (by dashboard" in d.find_element(By.CSS_SELECTOR, entry).text)
    done = wait_until(lambda: (r := manager.get(allowed.task_id)).status.terminal and r, 60)
    assert done.status == TaskStatus.COMPLETED and (allowed_dir / "out.txt").read_text() == "hi\n"
    answered = [e for _, e in manager.store.iter_events(allowed.task_id) if e["kind"] == "approval_answered"]
    assert answered[0]["decision"] == "allow" and answered[0]["by"].startswith("dashboard")
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, entry))  # gone once answered

    # Deny asks for an optional message, which the sub-agent is told
    other = f'.approval[data-request-id="{to_deny.request_id}"]'
    click(wait, f"{other} button.deny")
    box = browser.find_element(By.CSS_SELECTOR, f"{other} input.message")
    box.send_keys("not in the browser test")
    browser.execute_script("return new Promise(r => setTimeout(r, 1500))")  # refreshes keep what is typed
    assert browser.find_element(By.CSS_SELECTOR, f"{other} input.message").get_attribute("value") == (
        "not in the browser test"
    )
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: "denied (by dashboard" in d.find_element(By.CSS_SELECTOR, other).text)
    done = wait_until(lambda: (r := manager.get(denied.task_id)).status.terminal and r, 60)
    assert done.status == TaskStatus.COMPLETED and "not in the browser test" in done.result
    assert not (denied_dir / "out.txt").exists()
    wait.until(lambda d: not d.find_element(By.ID, "needs").is_displayed())
