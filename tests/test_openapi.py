"""/openapi.json describes exactly the routes the app serves, with the right methods."""

from __future__ import annotations

import json
import re

from tests.fixtures.services import services_for
from vramq.api import create_app


def test_openapi_matches_the_served_routes(make_settings):
    settings, _ = make_settings()
    app = create_app(services=services_for(settings))
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    spec = app.test_client().get("/openapi.json").get_json()
    documented = {path: set(ops) for path, ops in spec["paths"].items()}
    assert documented == served


# --- the document itself ----------------------------------------------------------------

import types  # noqa: E402

from vramq.api.openapi import BATCH_STATUSES, JOB_STATUSES, spec  # noqa: E402
from vramq.api.ratelimit import EXEMPT_PREFIXES  # noqa: E402
from vramq.jobs.catalog import TINY_CATALOG, load_catalog  # noqa: E402

CATALOG = load_catalog(TINY_CATALOG)
DOC = spec(types.SimpleNamespace(catalog=CATALOG))
METHODS = ("get", "post", "put", "patch", "delete")


def _operations():
    for path, ops in DOC["paths"].items():
        for method, op in ops.items():
            if method in METHODS:
                yield path, method, op


def test_the_document_is_valid_openapi_3_1():
    import openapi_spec_validator as validator

    validator.validate(DOC)


def test_every_ref_resolves():
    schemas = DOC["components"]["schemas"]

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/components/schemas/"), ref
                assert ref.rsplit("/", 1)[1] in schemas, ref
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(DOC)


def test_job_input_is_described_per_model_with_the_catalogs_limits():
    schemas = DOC["components"]["schemas"]
    for name in ("JobRequest", "BatchLine"):
        variants = schemas[name]["oneOf"]
        assert schemas[name]["discriminator"]["propertyName"] == "model"
        assert len(variants) == len(CATALOG)
        for entry, ref in zip(CATALOG, variants, strict=True):
            variant = schemas[ref["$ref"].rsplit("/", 1)[1]]
            assert variant["properties"]["model"]["const"] == entry.id
            assert variant["properties"]["input"] == {"$ref": f"#/components/schemas/Input_{entry.id}"}
            assert variant["additionalProperties"] is False
    assert schemas["BatchRequest"]["properties"]["jobs"]["anyOf"][0]["items"] == {
        "$ref": "#/components/schemas/BatchLine"
    }
    flux = schemas["Input_tiny-flux"]
    limit = CATALOG.get("tiny-flux").limit
    assert flux["additionalProperties"] is False and flux["required"] == ["prompt"]
    assert flux["properties"]["width"]["maximum"] == limit.max_width == 512
    assert flux["properties"]["width"]["minimum"] == limit.min_side
    assert flux["properties"]["width"]["multipleOf"] == limit.size_multiple
    assert flux["properties"]["num_images"]["maximum"] == limit.max_num_images
    video = schemas["Input_tiny-video"]["properties"]
    assert video["num_frames"]["enum"] == [1, 5, 9, 13, 17, 21, 25, 29, 33]  # frame_step 4, max_frames 33
    text = schemas["Input_tiny-qwen2"]
    assert text["properties"]["max_tokens"]["maximum"] == 2000
    assert [alt["required"] for alt in text["oneOf"]] == [["prompt"], ["messages"]]
    speech = schemas["Input_tiny-whisper"]["properties"]
    assert "en" in speech["language"]["anyOf"][0]["enum"] and speech["audio"]["pattern"]


def test_enums_for_statuses_and_models():
    schemas = DOC["components"]["schemas"]
    assert schemas["Job"]["properties"]["status"]["enum"] == list(JOB_STATUSES)
    assert schemas["Batch"]["properties"]["status"]["enum"] == list(BATCH_STATUSES)
    params = {p["name"]: p["schema"] for p in DOC["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert params["model"]["enum"] == [e.id for e in CATALOG]
    import re

    pattern = re.compile(params["status"]["pattern"])
    assert pattern.match("queued,failed") and not pattern.match("queued,") and not pattern.match("done")


def test_event_streams_are_text_event_stream():
    for path in ("/v1/jobs/{job_id}/events", "/v1/batches/{batch_id}/events"):
        assert list(DOC["paths"][path]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]


def test_refusals_are_listed_where_they_happen():
    for path, method, op in _operations():
        codes = set(op["responses"])
        probe = path.startswith(("/healthz", "/readyz", "/metrics"))
        assert ("429" in codes) == (not path.startswith(EXEMPT_PREFIXES)), (method, path)
        if not probe:
            assert {"400", "401"} <= codes, (method, path)
        # Under /openai/v1 errors are OpenAI's JSON, and 415 and 422 are answered 400 (api.openai.errors).
        openai_route = path.startswith("/openai/v1/")
        if "requestBody" in op:
            assert ({"400", "413"} if openai_route else {"413", "415", "422"}) <= codes, (method, path)
        for code, resp in op["responses"].items():
            if code.startswith(("4", "5")) and "content" in resp:
                media = ["application/json"] if openai_route else ["application/problem+json"]
                assert list(resp["content"]) == media, (method, path, code)
                if openai_route:
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}


def test_valid_input_by_the_document_is_accepted_by_submit():
    """Every job body the document calls valid passes the submit checks (the catalog's
    input models and the backend's own rules): the document is not looser than the API."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, assume, given, settings

    from vramq.jobs.batches.parsing import BatchLine
    from vramq.jobs.batches.parsing import parse_request as parse_batch
    from vramq.jobs.submit import check_worker_accepts, parse_request

    schema = schemathesis.openapi.from_dict(DOC)
    seen = set()

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema["/v1/jobs"]["POST"].as_strategy(), batch=schema["/v1/batches"]["POST"].as_strategy())
    def check(case, batch):
        # The one rule a schema cannot state: metadata at most 4096 bytes of JSON.
        metas = [case.body.get("metadata"), batch.body.get("metadata")] + [
            line.get("metadata") for line in batch.body.get("jobs") or () if isinstance(line, dict)
        ]
        assume(all(len(json.dumps(m)) <= 4096 for m in metas if m is not None))
        req = parse_request(case.body)
        entry = CATALOG.get(req.model)
        check_worker_accepts(entry, entry.validate_input(req.input))
        seen.add(req.model)
        for raw in parse_batch(batch.body).jobs or ():
            line = BatchLine.model_validate(raw)
            check_worker_accepts(CATALOG.get(line.model), CATALOG.get(line.model).validate_input(line.input))

    check()
    assert seen == {e.id for e in CATALOG}
