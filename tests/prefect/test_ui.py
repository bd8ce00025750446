"""The block form and the deployment Runs tab in a real browser (headless Chromium) on a real Prefect server.

Chromium is Debian's (``apt-get install chromium``), driven by the ``playwright``
package with ``executable_path``; nothing downloads a browser build.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import expect
from prefect import flow, get_client
from prefect.states import Completed

from prefect_blocks import SingletonBlock

from .real_server import PrefectServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Where the screenshots go (docs/images/ when refreshing the docs' pictures).
SHOTS = Path(os.environ.get("PREFECT_UI_SCREENSHOTS", ""))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        from tests.servers import unavailable

        unavailable("playwright", "pip install playwright (the browser is Debian's chromium)")
    if not os.path.exists(CHROMIUM):
        from tests.servers import unavailable

        unavailable("chromium", "apt-get install chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, server: PrefectServer):  # type: ignore[no-untyped-def]
    SingletonBlock.register_type_and_schema(_sync=True)  # type: ignore[call-arg]
    context = browser.new_context(viewport={"width": 1400, "height": 1100}, base_url=server.url)
    context.set_default_timeout(20_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    if str(SHOTS) not in ("", "."):
        page.screenshot(path=str(SHOTS / name), full_page=True)


def load(name: str) -> SingletonBlock:
    # Playwright's sync API runs an event loop in this thread, so Prefect's ``load`` would return a coroutine.
    return SingletonBlock.load(name, _sync=True)  # type: ignore[call-arg,return-value]


def field(page, label: str):  # type: ignore[no-untyped-def]
    """The input under a form label (the form's labels are not tied to their inputs by id)."""
    return page.locator(".p-label", has=page.locator("label", has_text=label)).locator("input, textarea").first


def open_form(page, name: str) -> None:  # type: ignore[no-untyped-def]
    # The form is built from the block schema the page fetches after it loads; a field filled
    # before then is reset as the form renders, and Create then refuses the form without a word.
    page.goto("/blocks/catalog/singleton/create")
    page.wait_for_load_state("networkidle")
    fill(page, "Block Name", name)


def fill(page, label: str, value: str) -> None:  # type: ignore[no-untyped-def]
    """Fill a form field and see that it kept the value."""
    field(page, label).fill(value)
    expect(field(page, label)).to_have_value(value)


def create(page) -> None:  # type: ignore[no-untyped-def]
    """Press Create once the form is settled, and wait for the new block's page."""
    page.wait_for_load_state("networkidle")
    page.get_by_role("button", name="Create").click()
    page.wait_for_url("**/blocks/block/**")


def test_block_form_fields_errors_and_secrets(page) -> None:  # type: ignore[no-untyped-def]
    name = f"form-{uuid.uuid4().hex[:6]}"
    open_form(page, name)
    # Every field is in view (none hidden in a collapsed section); only the URL is required.
    for label in ("Store URL", "Lock expire seconds", "Never expires", "Auto renew", "Name prefix"):
        assert page.get_by_text(label, exact=False).first.is_visible(), label
    assert page.locator("label", has_text="Store URL").inner_text().strip() == "Store URL"
    assert "(Optional)" in page.locator("label", has_text="Never expires").inner_text()
    assert page.get_by_role("button", name="null").count() == 0, "no null toggle: never expires is its own switch"
    shot(page, "prefect-block-form.png")

    # A URL without a scheme. The schema's pattern is there, but Prefect 3.9's block forms (V1 and V2)
    # and its API save a block without checking it: loading then says exactly what is wrong.
    fill(page, "Store URL", "127.0.0.1:6379")
    create(page)
    with pytest.raises(ValueError, match=f"Singleton block '{name}' cannot be used: url: the store URL needs a scheme"):
        load(name)

    name = f"form-{uuid.uuid4().hex[:6]}"
    open_form(page, name)
    # A good URL with a password, never expires: saved; the password never comes back.
    fill(page, "Store URL", "redis://:TopSecretPw@127.0.0.1:6379/0")
    switch = page.locator("label", has_text="Never expires").locator("xpath=../..").get_by_role("switch")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")
    create(page)
    page.get_by_text(f'SingletonBlock.load("{name}")', exact=False).first.wait_for()
    shot(page, "prefect-block-page.png")
    assert "TopSecretPw" not in page.content()
    assert page.content().count("BLOCK_NAME") == 0, "the code example names the block everywhere it is used"
    page.goto(page.url + "/edit")
    field(page, "Store URL").wait_for()
    assert "TopSecretPw" not in page.content()
    loaded = load(name)
    assert loaded.url.get_secret_value() == "redis://:TopSecretPw@127.0.0.1:6379/0"
    assert loaded.never_expires and loaded.get_singleton("x").lock_expire_seconds is None


@flow(name="ui-runs-tab")
def ui_runs_tab() -> None: ...


def test_deployment_runs_tab_lists_skips(page) -> None:  # type: ignore[no-untyped-def]
    """Skipped runs are missing from the tab's default filter (built-in state names only):
    ``skipped_state_name="Completed"`` is listed, and "All run states" shows every run."""
    states = {"ran": Completed(), "skipped": Completed(name="Skipped", message="lock 'x' is held by flow run 'a'"),
              "skipped-as-completed": Completed(message="Skipped: lock 'x' is held by flow run 'a'")}
    names = {}
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(ui_runs_tab)
        deployment_id = client.create_deployment(flow_id=flow_id, name=f"ui-{uuid.uuid4().hex[:6]}")
        for label, state in states.items():
            run = client.create_flow_run_from_deployment(deployment_id, name=f"{label}-{uuid.uuid4().hex[:4]}")
            client.set_flow_run_state(run.id, state, force=True)
            names[label] = run.name
    page.goto(f"/deployments/deployment/{deployment_id}?tab=Runs")
    page.get_by_text(names["ran"]).wait_for()
    listed = page.content()
    assert names["skipped-as-completed"] in listed, "a skip named Completed is listed by default"
    shot(page, "prefect-runs-tab-default.png")
    page.locator(".state-name-select button").first.click()
    page.keyboard.press("ArrowDown")  # the select opens its options from the keyboard
    page.get_by_role("option", name="All run states").click()
    page.get_by_text(names["skipped"]).wait_for()
    shot(page, "prefect-runs-tab-all-states.png")
    assert all(name in page.content() for name in names.values())
