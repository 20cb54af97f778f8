"""Property-based fuzzing of the live API against its own OpenAPI document (schemathesis).

Every operation of ``/openapi.json`` is called with generated requests, valid ones
(positive: the document's schemas, each model's input with the catalog's limits, so
real jobs reach the worker) and invalid ones (negative), anonymous and with an account's
API key. Each response must not be a 5xx, must have a status code and content type the
document lists for the operation, and must match the response schema given there. Each
request has a timeout, so a hang fails the test instead of stalling it.

Jobs and batches the fuzzer gets accepted are canceled at once, so the shared worker is
not left with a backlog for the session's other tests.

Nothing is excluded: admin routes answer 401/403 without the admin key (the shared
cluster has none), signed downloads 403 without a valid signature, and the event
streams 404 for the generated ids (the timeout covers a stream that would not end).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.e2e

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
#: Examples per operation, per mode and caller: small, so every operation is reached
#: within the test's time.
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
#: (connect, read) seconds for one request: a response slower than this is a hang.
TIMEOUT = (5, 20)


def _cleanup(session: requests.Session, base: str, headers: dict, response) -> None:
    """Cancel what a fuzzed request made, so the worker does not run it."""
    if response.status_code not in (200, 202):
        return
    try:
        body = response.json()
    except ValueError:
        return
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        return
    kind = {"job": "jobs", "batch": "batches"}.get(body.get("object"))
    if kind and body.get("status") in ("queued", "running"):
        session.post(f"{base}/v1/{kind}/{body['id']}/cancel", headers=headers, timeout=TIMEOUT)


def test_every_operation_conforms_to_the_document(shared_cluster):
    started = time.monotonic()
    base = shared_cluster.url
    key = shared_cluster.post("/v1/accounts", json={"name": "fuzz"}).json()["api_key"]
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    session = requests.Session()
    failures: list[str] = []
    seen: Counter = Counter()  # (operation, status): how far the fuzzer got, shown with -s
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for who, headers in (("anonymous", {}), ("keyed", {"Authorization": f"Bearer {key}"})):
            for mode, examples in EXAMPLES.items():

                @settings(
                    max_examples=examples,
                    deadline=None,
                    database=None,
                    derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                    report_multiple_bugs=False,
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case):  # called right below, in this iteration: the loop's values are current
                    response = case.call(base_url=base, session=session, headers=headers, timeout=TIMEOUT)  # noqa: B023
                    seen[operation.label, response.status_code] += 1  # noqa: B023
                    try:
                        case.validate_response(response, checks=CHECKS, headers=headers)  # noqa: B023
                    finally:
                        _cleanup(session, base, headers, response)  # noqa: B023

                try:
                    run()
                except Unsatisfiable:
                    assert mode is GenerationMode.NEGATIVE  # nothing of the operation can be made invalid
                except Exception as exc:
                    failures.append(f"{operation.label} [{who}, {mode.value}]:\n{exc}")
    assert operations >= 30, f"only {operations} operations in the document"
    elapsed = time.monotonic() - started
    print(f"\n{operations} operations, {sum(seen.values())} requests in {elapsed:.0f}s")
    for (label, status), n in sorted(seen.items()):
        print(f"  {label:50} {status} x{n}")
    # The positive cases reached a worker: jobs of every kind were accepted.
    assert seen["POST /v1/jobs", 202] > 0, "no generated job was accepted"
    assert not failures, f"{len(failures)} failing operation runs ({elapsed:.0f}s):\n\n" + "\n\n".join(failures)
