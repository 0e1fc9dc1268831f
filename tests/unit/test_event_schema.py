"""docs/entity-mutation.schema.json: the published contract agrees with the decoder on every sample."""

import base64
import binascii
import json
import re
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from handler.domain.decode import decode_value
from handler.domain.model import EntityMutation, InvalidRecord, RecordRef

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "entity-mutation.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
# Refusals that depend on the function's clock, which a schema cannot express.
CLOCK_CHECKS = {"future_timestamp"}
MSK_SAMPLES = sorted(
    p for p in (ROOT / "events").glob("*.json") if json.loads(p.read_text()).get("eventSource") == "aws:kafka"
)


def sample_records(path: Path) -> list[tuple[str, object, object]]:
    """(where, raw record value, parsed JSON or None when the value is not base64 JSON)."""
    found = []
    for records in json.loads(path.read_text())["records"].values():
        for record in records:
            where = f"{path.name} {record['partition']}@{record['offset']}"
            try:
                parsed = json.loads(base64.b64decode(record["value"], validate=True))
            except (TypeError, ValueError, binascii.Error):
                parsed = None
            found.append((where, record["value"], parsed))
    return found


def test_schema_is_a_valid_draft_2020_12_schema():
    Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", MSK_SAMPLES, ids=lambda p: p.name)
def test_every_sample_record_the_decoder_accepts_validates_and_every_other_json_record_does_not(path):
    for where, raw, parsed in sample_records(path):
        decoded = decode_value(RecordRef("t-0", 0), raw, now_ms=int(time.time() * 1000))
        if parsed is None:
            assert isinstance(decoded, InvalidRecord), where
            continue
        errors = [e.message for e in VALIDATOR.iter_errors(parsed)]
        if isinstance(decoded, EntityMutation):
            assert errors == [], f"{where}: decoded but the schema says {errors}"
        elif decoded.reason not in CLOCK_CHECKS:
            assert errors, f"{where}: the decoder refused it ({decoded.detail}) but the schema accepts it"


def test_sample_events_exercise_the_optional_fields():
    values = [parsed for path in MSK_SAMPLES for _, _, parsed in sample_records(path) if isinstance(parsed, dict)]
    assert any("changedFields" in v for v in values)
    assert any("timeHints" in v and {"old", "new"} <= v["timeHints"]["createdAt"].keys() for v in values)


def readme_examples() -> list[dict[str, object]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The mutation event", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


def test_schema_and_readme_examples_validate_and_decode():
    examples = SCHEMA["examples"] + readme_examples()
    assert len(examples) >= 2
    for example in examples:
        assert list(VALIDATOR.iter_errors(example)) == []
        assert isinstance(EntityMutation.model_validate(example), EntityMutation)


def test_readme_field_table_names_every_schema_property():
    text = (ROOT / "README.md").read_text().split("## The mutation event", 1)[1].split("\n## ", 1)[0]
    for name in SCHEMA["properties"]:
        assert f"`{name}`" in text, name


@pytest.mark.parametrize(
    "value",
    [
        {"timeHints": {"createdAt": {}}},
        {"timeHints": {"createdAt": {"old": "yesterday", "new": 1}}},
        {"timeHints": {"createdAt": {"before": 1}}},
        {"changedFields": "status"},
        {"changedFields": ["status", "status"]},
    ],
)
def test_schema_refuses_malformed_optional_fields_that_the_decoder_tolerates(value):
    # The decoder degrades such advice to "refresh the whole target" (never loses the record); the
    # schema tells producers what to fix.
    event = {
        "eventType": "ENTITY_UPDATED",
        "entityType": "User",
        "entityId": "u",
        "tenantId": "t",
        "timestamp": 1,
        **value,
    }
    assert list(VALIDATOR.iter_errors(event))
    assert isinstance(EntityMutation.model_validate(event), EntityMutation)
