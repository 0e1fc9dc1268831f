"""The docker-free local tools: the MSK event builder and the local invoke."""

import io
import json
import sys

from handler.domain.decode import decode_msk_event
from handler.wiring import now_ms
from preagg_cli import local
from tests.builders import EVENTS, mutation


def test_make_event_builds_an_msk_event_from_json_lines(monkeypatch, capsys):
    lines = "\n".join([json.dumps(mutation("tenant-1")), json.dumps(mutation("tenant-2")), "null", '"%%%"'])
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines + "\n"))
    assert local.main(["make-event", "--partitions", "3"]) == 0
    event = json.loads(capsys.readouterr().out)
    assert event["eventSource"] == "aws:kafka"
    assert all(key.startswith("core.entities.lifecycle.mutated-") for key in event["records"])
    batch = decode_msk_event(event, now_ms=now_ms())
    assert [m.tenant_id for _, m in batch.mutations] == ["tenant-1", "tenant-2"]
    # A JSON string line is the raw record value (README), not the base64 field: `"%%%"` is not JSON.
    assert sorted(b.reason for b in batch.invalid) == ["not_json", "null_value"]


def test_make_event_offsets_are_consecutive_per_partition():
    event = local.build_msk_event([mutation(entity_id=str(i)) for i in range(5)], partitions=1)
    (records,) = event["records"].values()
    assert [r["offset"] for r in records] == [100, 101, 102, 103, 104]


def test_local_invoke_prints_the_response_and_what_it_asked_of_cube():
    out = io.StringIO()
    assert local.invoke(str(EVENTS / "burst-3-tenants.json"), use_stack=False, out=out) == 0
    text = out.getvalue()
    assert '"batchItemFailures": []' in text
    assert "3 POST /v1/pre-aggregations/jobs" in text
    assert 'tenant-2: {"contexts":[{"securityContext":{"tenantId":"tenant-2"}}]' in text
