"""The web page (``/``) in a real browser: Debian's Chromium driven by Playwright.

One browser for the module, a fresh context (cookies, storage) per test. The contexts
bypass the page's Content-Security-Policy only so that Playwright may evaluate its
waiting conditions (a string evaluated in the page is what the policy forbids); the
policy itself is checked from the response header, and the image test records every
request the page makes. The jobs run on
the session's shared cluster; the cancel and out-of-tokens tests use a small API of their
own (its anonymous allowance is 150 tokens, and its models are announced as loading, so a
job stays queued until canceled).

``VRAMQ_SCREENSHOTS=1`` also writes the main screens to docs/screenshots/ (the README's).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from pathlib import Path

import pytest
import requests

from tests.audio import tone, wav_bytes
from tests.conftest import require, settings_env

CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium); never downloaded
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
JOB_TIMEOUT_MS = 120_000  # the shared cluster's CPU worker on a busy machine
METERED_TOKENS = 150  # the metered API's anonymous allowance: a default job fits, a large image does not


@pytest.fixture(scope="module")
def browser():
    require(Path(CHROMIUM).exists(), f"Chromium at {CHROMIUM} (apt-get install chromium)")
    require(importlib.util.find_spec("playwright") is not None, "the playwright package (the test extra)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1024, "height": 900}, bypass_csp=True)
    ctx.set_default_timeout(30_000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context):
    return context.new_page()


@pytest.fixture(scope="module")
def metered_cluster(tmp_path_factory, models_dir):
    """An API alone, 150 anonymous tokens a day, with tiny-flux and tiny-video announced by
    a worker that is still loading them: jobs are admitted and stay queued."""
    from tests.fixtures.procs import Cluster
    from tests.fixtures.services import start_redis

    tmp = tmp_path_factory.mktemp("metered")
    redis_server = start_redis(tmp / "redis")
    env = settings_env(tmp, redis_url=redis_server.url, models_dir=models_dir, anonymous_daily_tokens=METERED_TOKENS)
    c = Cluster(env=env, workdir=tmp)
    stop = threading.Event()

    def announce():  # the heartbeat lives 15 s: renew it while the module runs
        while not stop.is_set():
            c.announce_loading_worker(["tiny-flux", "tiny-video"])
            stop.wait(4)

    beat = threading.Thread(target=announce, daemon=True)
    try:
        c.start_api()
        beat.start()
        yield c
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        c.stop()
        redis_server.stop()


def shot(page, name: str, full_page: bool = False) -> None:
    if os.environ.get("VRAMQ_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def open_page(page, url: str):
    resp = page.goto(url + "/")
    page.wait_for_function(
        "document.body.dataset.ready === 'true' && document.querySelectorAll('#model option').length"
    )
    return resp


def generate(page, model: str, prompt: str | None = None) -> str:
    """Fill the form and press Generate; the job's id."""
    page.get_by_label("Model", exact=True).select_option(model)
    if prompt is not None:
        page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.getElementById('run').dataset.job")
    return page.locator("#run").get_attribute("data-job")


def wait_status(page, status: str, timeout: float = JOB_TIMEOUT_MS) -> None:
    page.wait_for_function(
        f"document.getElementById('status').dataset.status === '{status}'", timeout=timeout, polling=100
    )


def test_anonymous_image_job_from_form_to_picture(shared_cluster, page):
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    resp = open_page(page, shared_cluster.url)
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    page.get_by_label("Model", exact=True).select_option("tiny-flux")
    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    # The cost is estimated before the job is submitted.
    page.wait_for_function("/^[0-9,]+ tokens$/.test(document.getElementById('estimate').value)")
    estimate = int(page.locator("#estimate").inner_text().split()[0].replace(",", ""))
    shot(page, "form")
    job_id = generate(page, "tiny-flux")
    wait_status(page, "succeeded")
    img = page.locator("#media img")
    img.wait_for()
    page.wait_for_function(
        "(() => { const i = document.querySelector('#media img'); return i.complete && i.naturalWidth; })()"
    )
    assert page.evaluate("document.querySelector('#media img').naturalWidth") == 64  # the model's default size
    assert page.get_by_role("progressbar").get_attribute("aria-valuenow") == "100"
    assert page.get_by_role("link", name="Download").get_attribute("href") == img.get_attribute("src")
    job = shared_cluster.get(f"/v1/jobs/{job_id}").json()  # the same anonymous caller (127.0.0.1)
    assert job["status"] == "succeeded" and job["usage"]["tokens_reserved"] == estimate
    assert job["input"]["prompt"] == "a lighthouse at dusk"
    shot(page, "image")
    # Nothing was asked of any host but vramq's own.
    assert requested and all(u.startswith(shared_cluster.url + "/") for u in requested), requested


def test_a_chat_reply_streams_in(shared_cluster, page):
    open_page(page, shared_cluster.url)
    page.get_by_label("Model", exact=True).select_option("tiny-qwen2")
    page.get_by_label("Max tokens", exact=True).fill("24")
    job_id = generate(page, "tiny-qwen2", "Tell me about GPUs")
    wait_status(page, "succeeded")
    text = page.locator("#text-output")
    job = shared_cluster.get(f"/v1/jobs/{job_id}").json()
    assert int(text.get_attribute("data-deltas")) >= 1  # the text came as delta events…
    assert text.get_attribute("data-stream-matches") == "true"  # …adding up to the reply
    assert text.text_content() == job["output"]["text"]
    assert job["input"]["max_tokens"] == 24
    shot(page, "chat")


def test_a_transcription_from_an_uploaded_wav(shared_cluster, page, tmp_path):
    wav = tmp_path / "tone.wav"
    wav.write_bytes(wav_bytes(tone(2.0)))
    open_page(page, shared_cluster.url)
    page.get_by_label("Model", exact=True).select_option("tiny-whisper")
    assert page.get_by_label("Prompt", exact=True).is_hidden()  # speech takes a file, not a prompt
    page.get_by_label("Audio file", exact=True).set_input_files(str(wav))
    page.wait_for_function("/^[0-9,]+ tokens$/.test(document.getElementById('estimate').value)")
    job_id = generate(page, "tiny-whisper")
    wait_status(page, "succeeded")
    job = shared_cluster.get(f"/v1/jobs/{job_id}").json()
    assert job["input"]["audio"].startswith("file_") and job["output"]["duration"] == pytest.approx(2.0, abs=0.1)
    assert page.locator("#text-output").text_content() == job["output"]["text"]
    for name, marker in (("SRT", ""), ("VTT", "WEBVTT")):
        href = page.get_by_role("link", name=name, exact=True).get_attribute("href")
        got = page.request.get(href)
        assert got.status == 200 and got.text().startswith(marker)
    shot(page, "transcript")


def test_cancel_a_queued_job(metered_cluster, page):
    open_page(page, metered_cluster.url)
    job_id = generate(page, "tiny-video", "waves")
    wait_status(page, "queued", 30_000)
    page.wait_for_function("/Position 1 in the queue/.test(document.getElementById('queue').textContent)")
    shot(page, "queued")
    page.get_by_role("button", name="Cancel").click()
    wait_status(page, "canceled", 30_000)
    assert page.get_by_role("button", name="Cancel").is_hidden()
    assert metered_cluster.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_out_of_tokens_says_how_many_are_missing_and_when_they_reset(metered_cluster, page):
    open_page(page, metered_cluster.url)
    page.get_by_label("Model", exact=True).select_option("tiny-flux")
    page.get_by_label("Prompt", exact=True).fill("a very large picture")
    for label, value in (("Width", "512"), ("Height", "512"), ("Steps", "50")):
        page.get_by_label(label, exact=True).fill(value)
    page.wait_for_function(f"/you have {METERED_TOKENS} left/.test(document.getElementById('estimate').value)")
    needed = int(page.locator("#estimate").inner_text().split()[0].replace(",", ""))
    assert needed > METERED_TOKENS
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.wait_for()
    message = alert.inner_text()
    assert f"needs {needed:,}" in message and f"({needed - METERED_TOKENS:,} missing)" in message, message
    assert "resets" in message
    assert page.locator("#run").is_hidden()  # nothing was queued
    assert page.locator("#allowance").inner_text() == str(METERED_TOKENS)
    shot(page, "out-of-tokens")


def test_bulk_prompts_run_as_a_batch_with_a_results_manifest(shared_cluster, page):
    shared_cluster.ensure_dispatcher()  # it finishes batches (their manifest)
    open_page(page, shared_cluster.url)
    page.get_by_label("Model", exact=True).select_option("tiny-flux")
    page.get_by_label("Prompts, one a line (with the model above)").fill("a red fox\n\na blue whale\na green frog\n")
    page.get_by_role("button", name="Start batch").click()
    status = page.locator("#bulk-status")
    page.wait_for_function(  # done, or an error message in its place
        "(t => t && !/^Batch (queued|running)/.test(t))(document.getElementById('bulk-status').textContent)",
        timeout=JOB_TIMEOUT_MS,
        polling=200,
    )
    assert status.text_content().startswith("Batch completed: 3 succeeded, 0 failed"), status.text_content()
    href = page.get_by_role("link", name="Download results manifest").get_attribute("href")
    manifest = requests.get(href if href.startswith("http") else shared_cluster.url + href, timeout=30)
    lines = [json.loads(line) for line in manifest.text.splitlines()]
    assert [m["custom_id"] for m in lines] == ["line-1", "line-2", "line-3"]
    assert all(m["error"] is None and m["output"]["images"] for m in lines), lines


def test_an_account_sees_its_job_in_history(shared_cluster, page):
    open_page(page, shared_cluster.url)
    page.get_by_role("button", name="Create free account").click()
    page.wait_for_function("document.getElementById('new-key-value').textContent.startsWith('vq_')")
    key = page.locator("#new-key-value").inner_text()
    assert key and page.evaluate("localStorage.getItem('vramq.api_key')") == key
    page.get_by_role("button", name="Done").click()
    page.wait_for_function("document.getElementById('tier').textContent.startsWith('Account')")
    job_id = generate(page, "echo", "history please")
    wait_status(page, "succeeded")
    page.get_by_role("button", name="History").click()
    entry = page.locator("#history-list li button", has_text="history please")
    entry.wait_for()
    assert page.locator("#history-list li").count() == 1  # a new account: its own job only
    page.get_by_label("Kind", exact=True).select_option("image")
    page.locator("#history-list li", has_text="No jobs yet").wait_for()
    page.get_by_label("Kind", exact=True).select_option("text")
    entry.wait_for()
    shot(page, "history")
    page.locator("#text-output").evaluate("e => { e.textContent = ''; }")
    entry.click()  # reopens the result
    page.wait_for_function("document.getElementById('text-output').textContent === 'history please'")
    owned = shared_cluster.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert [j["id"] for j in owned] == [job_id]
    page.get_by_role("button", name="Sign out").click()
    assert page.get_by_role("button", name="History").is_hidden()
    assert page.evaluate("localStorage.getItem('vramq.api_key')") is None


def test_a_share_link_opens_without_a_key_and_404s_after_unshare(shared_cluster, browser, page):
    open_page(page, shared_cluster.url)
    generate(page, "tiny-flux", "shared sunrise")
    wait_status(page, "succeeded")
    page.get_by_role("button", name="Share").click()
    page.get_by_label("Public link", exact=True).wait_for()
    url = page.get_by_label("Public link", exact=True).input_value()
    assert re.fullmatch(re.escape(shared_cluster.url) + r"/s/[\w-]+", url), url
    stranger = browser.new_context(viewport={"width": 800, "height": 700}, bypass_csp=True)  # no storage, no key
    try:
        other = stranger.new_page()
        resp = other.goto(url)
        assert resp.status == 200
        other.locator("#media img").wait_for()
        other.wait_for_function("document.querySelector('#media img').naturalWidth > 0")
        assert other.get_by_role("button", name="Share").is_hidden()  # not the stranger's job
        assert other.get_by_label("Prompt", exact=True).is_hidden()
        shot(other, "shared")
        page.get_by_role("button", name="Unshare").click()
        page.get_by_label("Public link", exact=True).wait_for(state="hidden")
        resp = other.goto(url)
        assert resp.status == 404
        other.get_by_text("This link no longer works").wait_for()
    finally:
        stranger.close()


def test_the_page_fits_a_360_px_phone(shared_cluster, browser):
    ctx = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True, bypass_csp=True)
    try:
        page = ctx.new_page()
        open_page(page, shared_cluster.url)
        overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        assert page.evaluate(overflow) == 0
        generate(page, "echo", "a long line " * 40)
        wait_status(page, "succeeded")
        page.get_by_role("button", name="Share").click()
        page.get_by_label("Public link", exact=True).wait_for()
        assert page.evaluate(overflow) == 0  # with the result, its actions and the link shown
        # Every control has a name: a label, or its own text.
        unnamed = page.evaluate(
            """[...document.querySelectorAll('input, select, textarea, button')].filter(
                 e => !(e.labels && e.labels.length) && !e.textContent.trim() && !e.getAttribute('aria-label')
               ).map(e => e.id)"""
        )
        assert unnamed == []
        page.evaluate("window.scrollTo(0, 0)")
        shot(page, "mobile", full_page=True)
    finally:
        ctx.close()
