"""What the web page needs of the API, in process: the page and its files with their
policy, ``POST /v1/estimate``, ``?kind=`` in the history, and a share link opened by a
browser."""

from __future__ import annotations

from tests.fixtures.http import IMAGE

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def test_the_page_and_its_files_are_served_with_a_strict_policy(harness):
    h = harness()
    page = h.call("GET", "/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'<script type="module" src="/web/app.js">' in page.data
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    for name, mimetype in (("app.js", "text/javascript"), ("app.css", "text/css"), ("icon.svg", "image/svg+xml")):
        got = h.call("GET", f"/web/{name}")
        assert got.status_code == 200 and got.mimetype == mimetype and got.data, name
    missing = h.call("GET", "/web/index.html")  # only the listed files
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"


def test_estimate_is_what_a_submit_reserves_and_says_if_it_fits(harness):
    h = harness(anonymous_daily_tokens=250)
    big = {"model": "tiny-flux", "input": {"prompt": "x", "width": 512, "height": 512, "steps": 50}}
    small = h.call("POST", "/v1/estimate", json=IMAGE).get_json()
    assert small["tokens"] == 100 and small["tokens_left"] == 250 and small["enough"] is True
    large = h.call("POST", "/v1/estimate", json=big).get_json()
    assert large["tokens"] > 250 and large["enough"] is False
    assert h.submit(None, IMAGE).get_json()["usage"]["tokens_reserved"] == small["tokens"]
    assert h.call("POST", "/v1/estimate", json=IMAGE).get_json()["tokens_left"] == 150
    assert h.submit(None, big).status_code == 402  # what the estimate said
    bad = h.call("POST", "/v1/estimate", json={"model": "tiny-flux", "input": {"prompt": "x", "steps": 10_000}})
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["loc"][-1] == "steps"
    assert h.call("POST", "/v1/estimate", data="{}", headers={"Content-Type": "text/plain"}).status_code == 415


def test_history_filters_by_kind(harness):
    h = harness()
    _, key = h.account()
    image = h.submit(key, IMAGE).get_json()["id"]
    text = h.submit(key, {"model": "tiny-qwen2", "input": {"prompt": "hi", "max_tokens": 4}}).get_json()["id"]
    assert [j["id"] for j in h.call("GET", "/v1/jobs?kind=image", key).get_json()["data"]] == [image]
    assert [j["id"] for j in h.call("GET", "/v1/jobs?kind=text", key).get_json()["data"]] == [text]
    assert h.call("GET", "/v1/jobs?kind=speech", key).get_json()["data"] == []
    bad = h.call("GET", "/v1/jobs?kind=audio", key)
    assert bad.status_code == 422 and bad.get_json()["errors"][0]["loc"] == ["query", "kind"]


def test_a_share_link_is_the_page_for_a_browser_and_json_for_a_client(harness):
    h = harness()
    job = h.submit(None, IMAGE).get_json()["id"]
    url = h.call("POST", f"/v1/jobs/{job}/share").get_json()["url"]
    path = url[url.index("/s/") :]
    as_browser = h.call("GET", path, headers={"Accept": BROWSER_ACCEPT})
    assert as_browser.status_code == 200 and as_browser.mimetype == "text/html"
    assert h.call("GET", path).get_json()["id"] == job
    h.call("DELETE", f"/v1/jobs/{job}/share")
    gone = h.call("GET", path, headers={"Accept": BROWSER_ACCEPT})
    assert gone.status_code == 404 and gone.mimetype == "text/html"  # the page says the link is gone
    assert h.call("GET", path).get_json()["code"] == "not_found"
