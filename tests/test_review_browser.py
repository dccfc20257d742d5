"""A reviewer in a real browser: headless Chromium logs in to Label Studio, rejects one task and corrects the
narrative of another in one step (type, Submit), and `pull` sees both decisions.

Set SURD_UPDATE_DOCS=1 to refresh docs/review.png from this test's screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from labelstudio_server import labelstudio as labelstudio  # noqa: F401  (the session fixture)
from labelstudio_server import make_review_run

from annotations import labelstudio as ls

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "review.png"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
UI_TIMEOUT_MS = 120_000  # the labeling UI is a large bundle; two shared cores take a while


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium not installed: run `apt-get install -y chromium` (see scripts/setup_test_services.sh)")


def _narrative_box(page):
    return page.locator("textarea[name=corrected_narrative]")


def _open_task(page, base: str, project_id: int, task_id: int) -> None:
    page.goto(f"{base}/projects/{project_id}/data?task={task_id}")
    _narrative_box(page).wait_for(timeout=UI_TIMEOUT_MS)
    # The data manager may load the task a second time and rebuild the page (a fresh box): on a loaded
    # machine that takes seconds, so wait until it has stopped fetching before anyone types.
    page.wait_for_load_state("networkidle", timeout=UI_TIMEOUT_MS)


def _choose(page, value: str) -> None:
    page.locator(f'label:has(input[name="{value}"])').click()


def _submit(page) -> None:
    with page.expect_response(
        lambda r: "/annotations" in r.url and r.request.method == "POST", timeout=UI_TIMEOUT_MS
    ) as response:
        page.get_by_role("button", name="Submit").click()
    assert response.value.status == 201, response.value.text()


@pytest.mark.labelstudio
def test_reviewer_rejects_and_edits_in_the_browser(labelstudio, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    run = labelstudio.files_root / "browser"
    rows = {r["id"]: r for r in make_review_run(run, 4, size=(480, 360))}
    session = ls.Session(labelstudio.url, labelstudio.token)
    pushed = ls.push(session, run, "SURD browser review", images="local")
    assert (pushed.imported, pushed.images) == (4, "local")
    task_ids = {t.data["sample_id"]: t.id for t in session.tasks(pushed.project_id, with_annotations=False)}
    rejected_id, edited_id = "civitai:00", "diffusiondb:01"
    new_text = "a pink disc on a dark green background"

    blocked: list[str] = []

    def only_loopback(route) -> None:
        # The page may reference outside services (CDNs, telemetry); none of that leaves this machine.
        if route.request.url.startswith((labelstudio.url, "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    shot = tmp_path / "review.png"
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 860},
        )  # fmt: skip
        try:
            context.route("**/*", only_loopback)
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)

            page.goto(f"{labelstudio.url}/user/login/")
            page.fill("input[name=email]", labelstudio.username)
            page.fill("input[name=password]", labelstudio.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)

            _open_task(page, labelstudio.url, pushed.project_id, task_ids[rejected_id])
            assert page.get_by_text(rows[rejected_id]["narrative_prompt"]).first.is_visible()
            _choose(page, "Reject")
            _choose(page, "Bad or NSFW image")
            _submit(page)

            _open_task(page, labelstudio.url, pushed.project_id, task_ids[edited_id])
            box = _narrative_box(page)
            # The box is editable at once and holds the narrative under review: correcting it is typing.
            assert box.input_value() == rows[edited_id]["narrative_prompt"]
            box.fill(new_text)
            page.screenshot(path=str(shot))
            assert box.input_value() == new_text  # still the reviewer's text when they press Submit
            _submit(page)
        finally:
            context.close()

    path, table = ls.pull(session, run, "SURD browser review")
    got = {r["id"]: (r["decision"], r["corrected_narrative"], r["reject_reason"]) for r in table.to_pylist()}
    assert got == {rejected_id: ("rejected", None, "bad_image"), edited_id: ("edited", new_text, None)}
    assert path == run / "reviews.parquet"

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    if os.environ.get("SURD_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.write_bytes(png)
