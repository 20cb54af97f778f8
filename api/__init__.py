"""The HTTP API: a thin Flask app over ``jobs`` (validation, state) and ``storage`` (links).

Importing this package imports neither Flask nor any model library: the ``vramq`` command
lives here too, and processes it starts (a worker's vLLM engine processes re-import the
main module) must not carry Flask's context-bound globals, which vLLM's start-up trips over.
"""

from __future__ import annotations


def create_app(settings=None, services=None):
    """The application factory (see ``api.app.create_app``)."""
    from .app import create_app as _create_app

    return _create_app(settings, services)
