"""The OpenAPI document is valid, covers every route, and real responses match it."""

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_document_is_valid_and_complete(server, openapi_checker):
    """Validates as OpenAPI 3.1 and lists every registered route."""
    from openapi_spec_validator import validate

    resp = await server.api.get("/api/v1/openapi.json")
    assert resp.status == 200
    doc = resp.json
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    for name, table in server.service.route_tables.items():
        for route in table.routes:
            path = table.prefix + route.path
            assert route.method.lower() in doc["paths"][path], (name, path)
    # Responses the tests receive are checked against this document as they arrive.
    _, key = await server.new_org()
    before = openapi_checker.checked
    await server.api.post("/api/v1/inboxes", {"username": "spec"}, key=key)
    await server.api.get("/api/v1/inboxes", key=key)
    await server.api.get("/api/v1/inboxes/inb_01M8K0T69GDHM7HC0RJ4FYJB6T", key=key)
    assert openapi_checker.checked == before + 3


@pytest_twisted.ensureDeferred
async def test_checker_rejects_a_response_that_breaks_the_schema(server, openapi_checker):
    """The checker is not a rubber stamp: a malformed inbox fails validation."""
    import jsonschema
    import pytest

    await server.api.get("/healthz")  # the first call loads the served document
    assert openapi_checker.document is not None
    with pytest.raises(jsonschema.ValidationError):
        openapi_checker.check("GET", "/api/v1/inboxes/inb_x", 200, {"id": "inb_x"})
