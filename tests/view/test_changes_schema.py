"""The ``edge-view-changes/1`` JSON Schema accepts what :func:`changes_between` writes and refuses what it must."""

from __future__ import annotations

import json

from bench.generate import generate_view
from edge.view.changes import CHANGES_FORMAT, changes_between
from tests.view.test_incremental_http import changed


def test_changes_documents_follow_their_schema() -> None:
    from pathlib import Path

    from jsonschema import Draft202012Validator, FormatChecker
    from referencing import Registry, Resource

    docs = Path(__file__).resolve().parents[2] / "docs"
    view_schema = json.loads((docs / "edge-view-1.schema.json").read_text())
    schema = json.loads((docs / "edge-view-changes-1.schema.json").read_text())
    registry = Registry().with_resource(view_schema["$id"], Resource.from_contents(view_schema))
    validator = Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())
    old = generate_view(instances=20, networks=2, serial=5)
    new = changed(old, 6, 3, "m5.large")
    del new["instances"][4]
    answer = changes_between(old, new)
    assert answer["changed"] and answer["removed"]
    validator.validate(answer)
    validator.validate({"format": CHANGES_FORMAT, "since": 1, "too_old": True})
    validator.validate({"format": CHANGES_FORMAT, "since": 6, "serial": 6, "changed": [], "removed": []})
    for bad in ({"format": CHANGES_FORMAT, "since": 1},  # neither serial nor too_old
                {"format": CHANGES_FORMAT, "since": 1, "serial": 2, "changed": [{"id": "i-1"}]},  # not an instance
                {"format": CHANGES_FORMAT, "since": 1, "too_old": True, "removed": ["i-1"]}):
        assert list(validator.iter_errors(bad)), bad


def test_the_example_in_the_specification_is_valid() -> None:
    import re
    from pathlib import Path

    from jsonschema import Draft202012Validator, FormatChecker
    from referencing import Registry, Resource

    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "view-format.md").read_text()
    section = text[text.index("### Over HTTP: `since`"):text.index("### In etcd: a keyspace")]
    (example,) = re.findall(r"```json\n(.*?)```", section, re.S)
    view_schema = json.loads((docs / "edge-view-1.schema.json").read_text())
    registry = Registry().with_resource(view_schema["$id"], Resource.from_contents(view_schema))
    schema = json.loads((docs / "edge-view-changes-1.schema.json").read_text())
    Draft202012Validator(schema, registry=registry, format_checker=FormatChecker()).validate(json.loads(example))
