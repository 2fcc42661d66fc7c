"""`legato ui` in a real browser: a real daemon, a real `legato ui`, Debian's Chromium.

Agents act through the Python client while the page is open; every check
waits for what a person would see (role and label locators), never for time.
`LEGATO_UI_SCREENSHOTS=DIR` saves the README's screenshots of the three pages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from legato.client import Client, TaskStatus
from ui_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CallCounter,
    UIProcess,
    legato_processes,
    require_chromium,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

# "Within a second" for a new task to show; other waits allow a loaded machine.
APPEARS = 1_000
WAIT = 10_000
# How long open pages are watched doing nothing: three periods of a poll once a second.
QUIET_SECONDS = 3.0


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("LEGATO_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def tmp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lg-ui-"))  # short: unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def legato(tmp_dir: Path) -> Iterator[UIProcess]:
    with legato_processes(tmp_dir) as (_, ui):
        yield ui


@pytest.fixture(scope="module")
def admin(legato: UIProcess) -> Iterator[Client]:
    with Client(legato.daemon.address, api_key=legato.daemon.admin_key) as client:
        yield client


@pytest.fixture(scope="module")
def agents(admin: Client, legato: UIProcess) -> Iterator[dict[str, Client]]:
    """Clients of agents coder (@coder), researcher (@researcher), specialist (@specialist)."""
    clients = {}
    for name in ("coder", "researcher", "specialist"):
        _, key = admin.create_agent(name, labels=[f"@{name}"])
        clients[name] = Client(legato.daemon.address, api_key=key)
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_ui(browser: Browser, ui: UIProcess) -> Page:
    """A new browser session on the link `legato ui` printed, signed in and live."""
    from playwright.sync_api import expect

    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.goto(ui.link)
    expect(page.get_by_role("heading", name="Tasks")).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible(timeout=WAIT)
    return page


@pytest.fixture
def page(browser: Browser, legato: UIProcess) -> Iterator[Page]:
    page = open_ui(browser, legato)
    yield page
    page.context.close()


def row_of(page: Page, request: str) -> Any:
    link = page.get_by_role("link", name=re.compile("^" + re.escape(request)))
    return page.get_by_role("row").filter(has=link)


def open_task(page: Page, request: str) -> None:
    from playwright.sync_api import expect

    page.get_by_role("link", name=re.compile("^" + re.escape(request))).click()
    expect(page.get_by_role("heading", name=request, level=1)).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible(timeout=WAIT)


# -- the tasks page ------------------------------------------------------------------------


def test_a_new_task_appears_at_once_and_follows_its_status(
    page: Page, agents: dict[str, Client], legato: UIProcess
) -> None:
    from playwright.sync_api import expect

    assert "token" not in page.url  # taken off the address as soon as the page read it
    assert legato.daemon.admin_key not in page.content()
    request = "What is the Tier 1 rate limit?"
    handle = agents["coder"].create_task(request, labels=["@researcher"])
    row = row_of(page, request)
    expect(row).to_be_visible(timeout=APPEARS)
    expect(row.get_by_role("cell", name="pending", exact=True)).to_be_visible(timeout=WAIT)
    expect(row.get_by_role("cell", name="coder", exact=True)).to_be_visible(timeout=WAIT)

    job = agents["researcher"].claim(task_id=handle.id)
    assert job is not None
    expect(row.get_by_role("cell", name="claimed", exact=True)).to_be_visible(timeout=WAIT)
    expect(row.get_by_role("cell", name="researcher", exact=True)).to_be_visible(timeout=WAIT)
    job.complete({"rpm": 500})
    expect(row.get_by_role("cell", name="done", exact=True)).to_be_visible(timeout=WAIT)
    expect(row.get_by_role("cell", name="1/3", exact=True)).to_be_visible(timeout=WAIT)

    page.get_by_label("Status").select_option("done")
    expect(row).to_be_visible(timeout=WAIT)
    page.get_by_label("Status").select_option("pending")
    expect(row).to_be_hidden(timeout=WAIT)
    page.get_by_label("Status").select_option("")
    expect(row).to_be_visible(timeout=WAIT)


def test_the_label_filter_shows_only_that_label_live(page: Page, agents: dict[str, Client]) -> None:
    from playwright.sync_api import expect

    specialist_task = "Exact Tier 2 RPM?"
    agents["coder"].create_task(specialist_task, labels=["@specialist"])
    expect(row_of(page, specialist_task)).to_be_visible(timeout=WAIT)
    page.get_by_label("Label").select_option("@researcher")
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible(timeout=WAIT)
    expect(row_of(page, specialist_task)).to_have_count(0, timeout=WAIT)
    researcher_task = "Which SDK version?"
    agents["coder"].create_task(researcher_task, labels=["@researcher"])
    agents["coder"].create_task("Not for researchers", labels=["@specialist"])
    expect(row_of(page, researcher_task)).to_be_visible(timeout=WAIT)
    assert "label=%40researcher" in page.url or "label=@researcher" in page.url
    expect(page.get_by_role("row").filter(has_text="Not for researchers")).to_have_count(0)


def test_a_task_for_a_label_nobody_holds_shows_up_with_its_changes(
    page: Page, agents: dict[str, Client]
) -> None:
    from playwright.sync_api import expect

    # No agent holds the label and no task had it: the page's one watch of the
    # whole view brings it as it brings any other.
    request = "Ask the reseacher (a typo)"
    handle = agents["coder"].create_task(request, labels=["@reseacher"])
    row = row_of(page, request)
    expect(row.get_by_role("cell", name="pending", exact=True)).to_be_visible(timeout=APPEARS)
    handle.cancel()
    expect(row.get_by_role("cell", name="canceled", exact=True)).to_be_visible(timeout=WAIT)
    expect(row).to_have_count(1)
    # And the label filter offers the new label from now on.
    expect(page.get_by_label("Label").get_by_role("option", name="@reseacher")).to_have_count(1)


# -- the task page --------------------------------------------------------------------------


def test_the_task_page_streams_output_in_order_and_shows_the_result(
    page: Page, agents: dict[str, Client]
) -> None:
    from playwright.sync_api import expect

    request = "Summarise RFC 9113"
    context = {"rfc": 9113, "sections": ["streams", "flow control"], "depth": {"max": 2}}
    handle = agents["coder"].create_task(request, labels=["@researcher"], context=context)
    job = agents["researcher"].claim(task_id=handle.id)
    assert job is not None
    job.write("HTTP/2 multiplexes streams.\n")
    open_task(page, request)
    context_tree = page.get_by_role("region", name="Context")
    expect(context_tree.get_by_text('"flow control"')).to_be_visible(timeout=WAIT)
    output = page.get_by_role("log", name="Output")
    expect(output).to_have_text("HTTP/2 multiplexes streams.\n", timeout=WAIT)
    for line in ("Flow control is per stream.\n", "Priorities were deprecated.\n", "Done.\n"):
        job.write(line)
        expect(output.get_by_text(line.strip())).to_be_visible(timeout=WAIT)
    expect(output).to_have_text(
        "HTTP/2 multiplexes streams.\nFlow control is per stream.\n"
        "Priorities were deprecated.\nDone.\n",
        timeout=WAIT,
    )
    job.complete({"summary": "binary framing, streams, flow control", "pages": 62})
    result = page.get_by_role("region", name="Result")
    expect(result.get_by_text('"binary framing, streams, flow control"')).to_be_visible(
        timeout=WAIT
    )
    expect(
        page.get_by_role("heading", name=request).locator("xpath=..").get_by_text("done")
    ).to_be_visible(timeout=WAIT)
    history = page.get_by_role("region", name="History")
    written = len(output.text_content().encode())  # type: ignore[union-attr]
    expect(history.get_by_text(f"4 chunks, {written} bytes")).to_be_visible(timeout=WAIT)
    expect(history.get_by_text("completed")).to_be_visible(timeout=WAIT)


def test_a_question_is_answered_from_the_page_and_the_worker_gets_the_text(
    page: Page, agents: dict[str, Client]
) -> None:
    from playwright.sync_api import expect

    request = "What is our rate limit?"
    handle = agents["coder"].create_task(request, labels=["@researcher"])
    job = agents["researcher"].claim(task_id=handle.id)
    assert job is not None
    received: list[str] = []

    def work() -> None:
        received.append(job.ask("Tier 1 or Tier 2?", timeout=30))
        job.complete({"tier": received[0]})

    worker = threading.Thread(target=work)
    worker.start()
    try:
        open_task(page, request)
        expect(page.get_by_text("Tier 1 or Tier 2?").first).to_be_visible(timeout=WAIT)
        page.get_by_label("Answer").fill("Tier 2, the paid plan")
        page.get_by_role("button", name="Send answer").click()
    finally:
        worker.join(timeout=30)
    assert received == ["Tier 2, the paid plan"]
    expect(
        page.get_by_role("region", name="Result").get_by_text('"Tier 2, the paid plan"')
    ).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Send answer")).to_be_hidden(timeout=WAIT)
    assert handle.get().status is TaskStatus.DONE


def test_cancel_cancels_the_task_and_its_unfinished_children(
    page: Page, agents: dict[str, Client], admin: Client
) -> None:
    from playwright.sync_api import expect

    coder, researcher, specialist = agents["coder"], agents["researcher"], agents["specialist"]
    request = "Compare the three SDKs"
    parent = coder.create_task(request, labels=["@researcher"])
    job = researcher.claim(task_id=parent.id)
    assert job is not None
    job.write("Asking the specialist about each SDK.\n")
    open_child = researcher.create_task(
        "Python SDK limits?", labels=["@specialist"], parent_id=parent.id
    )
    finished_child = researcher.create_task(
        "Go SDK limits?", labels=["@specialist"], parent_id=parent.id
    )
    child_job = specialist.claim(task_id=finished_child.id)
    assert child_job is not None
    child_job.write("Go: 50 rpm by default.\n")
    child_job.complete({"rpm": 50})
    grandchild_job = specialist.claim(task_id=open_child.id)
    assert grandchild_job is not None
    grandchild = specialist.create_task(
        "Ask the Python maintainers", labels=["@coder"], parent_id=open_child.id
    )

    open_task(page, request)
    python_card = page.get_by_role("article", name="Python SDK limits?")
    go_card = page.get_by_role("article", name="Go SDK limits?")
    expect(go_card.get_by_text("done", exact=True)).to_be_visible(timeout=WAIT)
    expect(go_card.get_by_text("claimed by specialist")).to_be_visible(timeout=WAIT)
    go_card.get_by_text("Output").click()
    expect(go_card.get_by_role("log")).to_have_text("Go: 50 rpm by default.\n", timeout=WAIT)
    nested = python_card.get_by_role("article", name="Ask the Python maintainers")
    expect(nested.get_by_text("pending", exact=True)).to_be_visible(timeout=WAIT)
    grandchild_job.write("Looking at the Python client.\n")
    screenshot(page, "task")

    page.get_by_role("button", name="Cancel task").click()
    heading = page.get_by_role("heading", name=request).locator("xpath=..")
    expect(heading.get_by_text("canceled", exact=True)).to_be_visible(timeout=WAIT)
    expect(python_card.get_by_text("canceled", exact=True).first).to_be_visible(timeout=WAIT)
    expect(nested.get_by_text("canceled", exact=True)).to_be_visible(timeout=WAIT)
    expect(go_card.get_by_text("done", exact=True)).to_be_visible(timeout=WAIT)
    expect(page.get_by_role("button", name="Cancel task")).to_be_hidden(timeout=WAIT)
    statuses = {t.id: t.status for t in admin.get_task_tree(parent.id)}
    assert statuses == {
        parent.id: TaskStatus.CANCELED,
        open_child.id: TaskStatus.CANCELED,
        grandchild.id: TaskStatus.CANCELED,
        finished_child.id: TaskStatus.DONE,
    }


def test_cancel_can_keep_the_children_running(page: Page, agents: dict[str, Client]) -> None:
    from playwright.sync_api import expect

    request = "Plan the migration"
    parent = agents["coder"].create_task(request, labels=["@researcher"])
    job = agents["researcher"].claim(task_id=parent.id)
    assert job is not None
    child = agents["researcher"].create_task(
        "Inventory the tables", labels=["@specialist"], parent_id=parent.id
    )
    open_task(page, request)
    page.get_by_label("keep children running").check()
    page.get_by_role("button", name="Cancel task").click()
    heading = page.get_by_role("heading", name=request).locator("xpath=..")
    expect(heading.get_by_text("canceled", exact=True)).to_be_visible(timeout=WAIT)
    card = page.get_by_role("article", name="Inventory the tables")
    expect(card.get_by_text("pending", exact=True)).to_be_visible(timeout=WAIT)
    assert child.get().status is TaskStatus.PENDING


# -- the agents page ------------------------------------------------------------------------


def test_the_agents_page_shows_what_each_agent_holds_now(
    page: Page, agents: dict[str, Client]
) -> None:
    from playwright.sync_api import expect

    request = "Review the retry policy"
    handle = agents["coder"].create_task(request, labels=["@specialist"])
    page.get_by_role("link", name="Agents").click()
    specialist = page.get_by_role("row").filter(
        has=page.get_by_role("rowheader", name="specialist")
    )
    expect(specialist.get_by_role("cell", name="@specialist")).to_be_visible(timeout=WAIT)
    job = agents["specialist"].claim(task_id=handle.id)
    assert job is not None
    expect(specialist.get_by_role("link", name=request)).to_be_visible(timeout=WAIT)
    screenshot(page, "agents")
    job.complete({"ok": True})
    expect(specialist.get_by_role("link", name=request)).to_have_count(0, timeout=WAIT)


def test_the_list_holds_every_task_in_view_newest_first(page: Page, admin: Client) -> None:
    from playwright.sync_api import expect

    tasks = admin.list_tasks(page_size=1000).tasks
    assert len(tasks) > 10  # the tests before this one made them
    newest = tasks[-1].content
    expect(page.get_by_role("row")).to_have_count(1 + len(tasks), timeout=WAIT)
    first = page.get_by_role("row").nth(1)
    expect(first.get_by_role("link", name=newest)).to_be_visible(timeout=WAIT)
    expect(page.get_by_text(f"{len(tasks)} of {len(tasks)} tasks")).to_be_visible(timeout=WAIT)
    screenshot(page, "tasks")


def test_open_pages_make_no_calls_and_still_show_a_task_on_a_new_label(
    browser: Browser, legato: UIProcess, admin: Client, tmp_dir: Path
) -> None:
    """Nothing polls the daemon: the pages' watches bring everything, new labels too."""
    from playwright.sync_api import expect

    with CallCounter(legato.daemon.socket, tmp_dir / "relay.sock") as relay:
        ui = UIProcess(legato.daemon, legato.log.with_name("ui-relayed.log"), address=relay.address)
        ui.start()
        try:
            listing = open_ui(browser, ui)
            request = "Watched on two pages"
            handle = admin.create_task(request, labels=["@researcher"])
            task_page = listing.context.new_page()
            task_page.goto(f"{ui.origin}/tasks/{handle.id}")
            heading = task_page.get_by_role("heading", name=request).locator("xpath=..")
            expect(heading.get_by_text("pending", exact=True)).to_be_visible(timeout=WAIT)
            expect(task_page.get_by_role("status").filter(has_text="live")).to_be_visible(
                timeout=WAIT
            )
            handle.cancel()
            # Both pages' watches are open and delivering.
            expect(heading.get_by_text("canceled", exact=True)).to_be_visible(timeout=WAIT)
            row = row_of(listing, request)
            expect(row.get_by_role("cell", name="canceled", exact=True)).to_be_visible(timeout=WAIT)
            calls = relay.calls
            assert calls >= 2  # the relay sees the UI's calls: both pages' watches at least

            time.sleep(QUIET_SECONDS)  # the window watched, not a wait for something
            assert relay.calls == calls

            novel = "For a label nobody ever had"
            admin.create_task(novel, labels=["@brand-new"])
            expect(row_of(listing, novel)).to_be_visible(timeout=APPEARS)
            assert relay.calls == calls  # it came on the open watch
        finally:
            ui.stop()


# -- restarts --------------------------------------------------------------------------------


def test_an_open_page_catches_up_after_the_daemon_and_the_ui_restart(browser: Browser) -> None:
    """Nothing missed, nothing twice: the page resumes from the last seq it had."""
    from playwright.sync_api import expect

    tmp = Path(tempfile.mkdtemp(prefix="lg-rs-"))
    try:
        with legato_processes(tmp) as (daemon, ui):
            with Client(daemon.address, api_key=daemon.admin_key) as admin:
                _, key = admin.create_agent("worker", labels=["@work"])
            with Client(daemon.address, api_key=key) as worker:
                request = "Long task"
                handle = worker.create_task(request, labels=["@work"])
                job = worker.claim(task_id=handle.id, lease=600)
                assert job is not None
                job.write("a")
                listing = open_ui(browser, ui)
                task_page = listing.context.new_page()
                task_page.goto(f"{ui.origin}/tasks/{handle.id}")
                output = task_page.get_by_role("log", name="Output")
                expect(output).to_have_text("a", timeout=WAIT)

                daemon.stop()
                daemon.start()
                # Right after the restart, before the UI's watch is back:
                job.write("b")
                made = [f"Made after the daemon restart {n}" for n in range(3)]
                for content in made:
                    worker.create_task(content, labels=["@work"])
                expect(output).to_have_text("ab", timeout=WAIT)
                for content in made:
                    expect(row_of(listing, content)).to_have_count(1, timeout=WAIT)

                ui.stop()
                job.write("c")
                while_away = "Made while the UI was away"
                worker.create_task(while_away, labels=["@work"])
                job.complete({"ok": True})
                ui.start()  # the same port: the pages reconnect to it by themselves

                expect(output).to_have_text("abc", timeout=WAIT)
                expect(row_of(listing, while_away)).to_have_count(1, timeout=WAIT)
                expect(
                    row_of(listing, request).get_by_role("cell", name="done", exact=True)
                ).to_be_visible(timeout=WAIT)
                history = task_page.get_by_role("region", name="History")
                expect(history.get_by_text("3 chunks, 3 bytes")).to_be_visible(timeout=WAIT)
                for event in ("created", "claimed", "completed"):
                    expect(history.get_by_text(event, exact=True)).to_have_count(1)
                expect(listing.get_by_role("row")).to_have_count(1 + 1 + len(made) + 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- who may use it: plain HTTP requests -------------------------------------------------------


def test_requests_without_the_token_or_a_session_are_refused(legato: UIProcess) -> None:
    for path in ("/api/tasks", "/api/agents", "/api/events", "/api/session"):
        status, _, _ = legato.request("GET", path)
        assert status == 401, path
    status, _, _ = legato.request(
        "POST", "/api/session", headers={"Origin": legato.origin}, body={"token": "guess"}
    )
    assert status == 401
    status, _, body = legato.request(
        "GET", "/api/tasks", headers={"Cookie": f"legato_ui_{legato.port}=a.9999999999.b"}
    )
    assert status == 401
    # The page itself holds no data: it loads, and asks for the link's token.
    status, _, body = legato.request("GET", "/")
    assert status == 200 and b"legato" in body


def test_the_session_cookie_is_httponly_and_same_site_strict(legato: UIProcess) -> None:
    status, headers, body = legato.request(
        "POST", "/api/session", headers={"Origin": legato.origin}, body={"token": legato.token}
    )
    assert status == 200
    attributes = {part.strip().lower() for part in headers["set-cookie"].split(";")}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert legato.daemon.admin_key not in body.decode()
    cookie = headers["set-cookie"].split(";")[0]
    status, _, _ = legato.request("GET", "/api/tasks", headers={"Cookie": cookie})
    assert status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "rebound.example:80"},
        {"Host": "attacker.example"},
        {"Origin": "http://attacker.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
    ids=["foreign-host", "foreign-host-no-port", "foreign-origin", "null-origin", "cross-site"],
)
def test_a_foreign_host_or_origin_is_refused(legato: UIProcess, headers: dict[str, str]) -> None:
    cookie, _ = legato.sign_in()
    for path in ("/", "/api/tasks", "/static/js/app.js"):
        status, _, _ = legato.request("GET", path, headers={"Cookie": cookie, **headers})
        assert status == 403, (path, headers)
    status, _, _ = legato.request(
        "POST",
        "/api/session",
        headers={"Origin": legato.origin, **headers},
        body={"token": legato.token},
    )
    assert status == 403


def test_changes_need_the_csrf_token_and_a_same_origin(legato: UIProcess, admin: Client) -> None:
    handle = admin.create_task("Cancel me over HTTP", labels=["@researcher"])
    cookie, csrf = legato.sign_in()
    path = f"/api/tasks/{handle.id}/cancel"
    refused: list[dict[str, str]] = [
        {"Cookie": cookie, "Origin": legato.origin},
        {"Cookie": cookie, "Origin": legato.origin, "X-Legato-CSRF": "not-it"},
        {"Cookie": cookie, "X-Legato-CSRF": csrf},  # no Origin
        {"Cookie": cookie, "Origin": "http://attacker.example", "X-Legato-CSRF": csrf},
    ]
    for headers in refused:
        status, _, _ = legato.request("POST", path, headers=headers, body={})
        assert status == 403, headers
    assert handle.get().status is TaskStatus.PENDING
    status, _, body = legato.request(
        "POST",
        path,
        headers={"Cookie": cookie, "Origin": legato.origin, "X-Legato-CSRF": csrf},
        body={},
    )
    assert status == 200, body
    assert handle.get().status is TaskStatus.CANCELED


def test_legato_ui_says_so_when_the_daemon_is_not_running(tmp_dir: Path) -> None:
    from ui_harness import LEGATO

    unknown_key = "lgt_0123456789ab_" + "A" * 43
    done = subprocess.run(
        [str(LEGATO), "ui", "--address", f"unix:{tmp_dir}/none.sock", "--key", unknown_key],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "legato serve" in done.stderr
    assert done.stdout == ""  # no link printed


def test_with_an_agent_key_the_ui_shows_that_agents_view(
    legato: UIProcess, agents: dict[str, Client], admin: Client
) -> None:
    _, key = admin.create_agent("viewer", labels=["@viewer"])
    mine = "For the viewer"
    admin.create_task(mine, labels=["@viewer"])
    admin.create_task("Not for the viewer", labels=["@coder"])
    viewer = UIProcess(legato.daemon, legato.log.with_name("ui-viewer.log"), key=key)
    viewer.start()
    try:
        cookie, _ = viewer.sign_in()
        # One browser may hold both UIs' sessions: they are named apart.
        assert cookie.partition("=")[0] != legato.sign_in()[0].partition("=")[0]
        status, _, body = viewer.request("GET", "/api/tasks", headers={"Cookie": cookie})
        assert status == 200
        assert [t["title"] for t in json.loads(body)["tasks"]] == [mine]
        status, _, body = viewer.request("GET", "/api/agents", headers={"Cookie": cookie})
        assert status == 403
        assert "admin key" in json.loads(body)["error"]
        status, _, body = viewer.request("GET", "/api/session", headers={"Cookie": cookie})
        assert json.loads(body)["agent"]["name"] == "viewer"
        assert key not in body.decode()
    finally:
        viewer.stop()
