"""/openapi.json describes exactly the routes the app serves, with the right methods."""

from __future__ import annotations

import re

from api import create_app
from jobs.services import Services


def test_openapi_matches_the_served_routes(make_settings):
    settings, _ = make_settings()
    app = create_app(services=Services.from_settings(settings))
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    spec = app.test_client().get("/openapi.json").get_json()
    documented = {path: set(ops) for path, ops in spec["paths"].items()}
    assert documented == served
