"""The Flask application: blueprints, error handlers, request metrics."""

from __future__ import annotations

import time

from flask import Flask, g, request
from flask.json.provider import DefaultJSONProvider

from vramq.jobs.services import Services
from vramq.jobs.settings import Settings

from .wiring import services as wired_services


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """The application factory. ``services`` may be given by tests; else built from settings."""
    if services is None:
        services = wired_services(settings)
    app = Flask(__name__)
    app.config["VRAMQ"] = services
    app.config["MAX_CONTENT_LENGTH"] = services.settings.max_body_bytes
    if isinstance(app.json, DefaultJSONProvider):  # Flask's own: keep keys in the order they were written
        app.json.sort_keys = False

    from . import accounts_api, batches_api, files_api, guards, jobs_api, models_api, ops, problems, web_page
    from .callers import current_caller
    from .metrics import REQUESTS
    from .ratelimit import RateLimiter

    problems.install(app)
    settings = services.settings
    limiter = RateLimiter(
        services.broker_url, settings.rate_limit_anonymous, settings.rate_limit_keyed, settings.accounts_per_day
    )
    app.extensions["vramq.limiter"] = limiter
    from .streams import slots_for

    app.extensions["vramq.streams"] = slots_for(settings)  # api.server sizes it to its threads
    app.register_blueprint(jobs_api.bp)
    app.register_blueprint(accounts_api.bp)
    app.register_blueprint(batches_api.bp)
    app.register_blueprint(files_api.bp)
    app.register_blueprint(models_api.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(web_page.bp)
    from .openai import bp as openai_bp

    app.register_blueprint(openai_bp)  # /openai/v1

    @app.before_request
    def _start():
        """The checks of api.guards, in order, before any view: Host (400), NUL in the
        path or query (422), the caller (401 for a bad key) and its rate limit (429), the
        body's type (415) and size (413, from Content-Length, before reading it)."""
        g.t0 = time.perf_counter()
        if request.path.startswith(("/healthz", "/readyz", "/metrics")):
            return None  # probes and scrapers reach the API by any address; no links here
        refused = guards.check_host(settings.allowed_hosts)
        if refused is not None:
            return refused
        guards.check_path_and_query()
        caller = current_caller()
        limiter.check(caller)
        return guards.check_content_type(request.endpoint) or guards.apply_body_limit(
            request.endpoint, caller, settings
        )

    @app.after_request
    def _observe(resp):
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(request.method, endpoint, resp.status_code).observe(
            time.perf_counter() - g.get("t0", time.perf_counter())
        )
        return resp

    return app
