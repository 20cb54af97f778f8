"""The Flask application: blueprints, error handlers, request metrics."""

from __future__ import annotations

import time

from flask import Flask, g, request

from jobs.services import Services
from jobs.settings import Settings


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """The application factory. ``services`` may be given by tests; else built from settings."""
    if services is None:
        services = Services.from_settings(settings or Settings.from_env())
    app = Flask(__name__)
    app.config["VRAMQ"] = services
    app.config["MAX_CONTENT_LENGTH"] = services.settings.max_body_bytes
    app.json.sort_keys = False

    from . import accounts_api, batches_api, files_api, jobs_api, models_api, ops, problems
    from .callers import current_caller
    from .metrics import REQUESTS
    from .ratelimit import RateLimiter

    problems.install(app)
    limiter = RateLimiter(services.broker_url, services.settings.rate_limit_anonymous, services.settings.rate_limit_keyed)
    app.register_blueprint(jobs_api.bp)
    app.register_blueprint(accounts_api.bp)
    app.register_blueprint(batches_api.bp)
    app.register_blueprint(files_api.bp)
    app.register_blueprint(models_api.bp)
    app.register_blueprint(ops.bp)

    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        if not request.path.startswith(("/healthz", "/readyz", "/metrics")):
            limiter.check(current_caller())  # 401 for a bad key, 429 past the limit

    @app.after_request
    def _observe(resp):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(request.method, endpoint, resp.status_code).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return resp

    return app
