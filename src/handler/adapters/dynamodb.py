"""The debounce store on DynamoDB: one item per key, every decision a single conditional write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from handler.domain.errors import StoreUnavailable
from handler.domain.model import RefreshKey
from handler.domain.ports import BuildRecord, KeyState, Slot, Waiter, Waiting, WriteResult

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

_FIELDS = {
    "startedAt": "started_at",
    "claimToken": "claim_token",
    "dirtyAt": "dirty_at",
    "pendingSince": "pending_since",
    "trailingToken": "trailing_token",
    "trailingState": "trailing_state",
    "trailingDueAt": "trailing_due_at",
    "expiresAt": "expires_at",
    "buildStartedAt": "build_started_at",
    "buildStatus": "build_status",
    "buildSeenAt": "build_seen_at",
    "freshnessLagMs": "freshness_lag_ms",
    "buildFailureClass": "build_failure_class",
    "buildError": "build_error",
    "buildFailures": "build_failures",
    "retriggerDueAt": "retrigger_due_at",
    "jobsStartedAt": "jobs_started_at",
    "buildPartsOf": "build_parts_of",
    "windowMs": "window_ms",
    "windowEndsAt": "window_ends_at",
    "inflightUntil": "inflight_until",
    "queuedSeenAt": "queued_seen_at",
    "pollSeq": "poll_seq",
    "waitingSince": "waiting_since",
    "waitingUntil": "waiting_until",
}
# The sparse index of keys waiting for build budget (template.yaml, DebounceTable), oldest first.
WAITING_INDEX = "waiting"
WAIT_SCOPE = "global"  # handler.domain.admission.SCOPE: the one budget
# Items that are not refresh keys (budget slots) start with this: tenant ids cannot.
RESERVED_PREFIX = "_"
_NOT_WAITING = "waitScope, waitingSince, waitingUntil"


def slot_pk(scope: str, index: int) -> str:
    return f"{RESERVED_PREFIX}budget#{scope}#{index}"


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def to_state(item: dict[str, Any] | None) -> KeyState | None:
    if not item:
        return None
    values: dict[str, Any] = {}
    for attr, name in _FIELDS.items():
        raw = item.get(attr)
        if raw is None:
            continue
        values[name] = int(raw["N"]) if "N" in raw else raw["S"]
    tokens = item.get("jobTokens")
    if tokens is not None and "L" in tokens:
        values["job_tokens"] = tuple(t["S"] for t in tokens["L"])
    parts = item.get("buildParts")
    if parts is not None and "NS" in parts:
        values["build_parts"] = frozenset(int(n) for n in parts["NS"])
    return KeyState(**values)


class DynamoDBDebounceStore:
    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self.client = client
        self.table = table_name

    def _update(
        self,
        key: RefreshKey,
        update: str,
        condition: str | None,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> WriteResult:
        args: dict[str, Any] = {
            "TableName": self.table,
            "Key": {"pk": _s(key.pk)},
            "UpdateExpression": update,
            "ExpressionAttributeValues": values,
            "ReturnValues": "ALL_OLD",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
        if condition:
            args["ConditionExpression"] = condition
        if names:
            args["ExpressionAttributeNames"] = names
        try:
            response = self.client.update_item(**args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise StoreUnavailable(f"DynamoDB {exc.response.get('Error', {}).get('Code')}") from exc
            item: dict[str, Any] | None = exc.response.get("Item")  # type: ignore[assignment]
            # Stores that ignore ReturnValuesOnConditionCheckFailure (dynalite) need a read.
            return WriteResult(False, to_state(item) if item is not None else self.get(key))
        except BotoCoreError as exc:
            raise StoreUnavailable(f"DynamoDB unreachable: {type(exc).__name__}") from exc
        return WriteResult(True, to_state(response.get("Attributes")))

    def _ident(self, key: RefreshKey) -> dict[str, Any]:
        return {":tenant": _s(key.tenant_id), ":target": _s(key.target)}

    def claim(
        self,
        key: RefreshKey,
        *,
        now: int,
        window_ms: int,
        claim_token: str,
        expires_at: int,
        trailing_token: str | None = None,
        force: bool = False,
        trailing_due_at: int | None = None,
    ) -> WriteResult:
        values = {
            ":now": _n(now),
            ":claim": _s(claim_token),
            ":exp": _n(expires_at),
            ":base": _n(window_ms),
            **self._ident(key),
        }
        condition: str | None
        update = (
            "SET startedAt = :now, claimToken = :claim, expiresAt = :exp, tenantId = :tenant, #t = :target,"
            " windowEndsAt = if_not_exists(windowMs, :base) + :now"
        )
        # The window (the key's own end, and for items written before it the base window) and the
        # in-flight gate: no refresh of the key may be posted while one is in Cube.
        window = (
            "(attribute_not_exists(startedAt) OR startedAt <= :cutoff)"
            " AND (attribute_not_exists(windowEndsAt) OR windowEndsAt <= :now)"
            " AND (attribute_not_exists(inflightUntil) OR inflightUntil <= :now)"
        )
        if trailing_token is None:
            update += " REMOVE pendingSince"  # it covers every pending mutation (docs/load-aware.md)
            condition = None
            if not force:
                condition = window
                values[":cutoff"] = _n(now - window_ms)
        else:
            update += ", trailingToken = :tt, trailingState = :running"
            values.update({":tt": _s(trailing_token), ":running": _s("running"), ":cutoff": _n(now - window_ms)})
            current = ""
            if trailing_due_at is not None:  # a copy of a message re-sent later is not current
                current = "(attribute_not_exists(trailingDueAt) OR trailingDueAt <= :tdue) AND "
                values[":tdue"] = _n(trailing_due_at)
            condition = (
                "(attribute_not_exists(trailingToken) OR trailingToken = :tt) AND " + current + window + " AND "
                "((attribute_exists(dirtyAt) AND (attribute_not_exists(startedAt) OR dirtyAt >= startedAt))"
                " OR trailingState = :running)"
            )
        return self._update(key, update, condition, values, {"#t": "target"})

    @staticmethod
    def _restore(
        sets: list[str], removes: list[str], values: dict[str, Any], started_at: int | None, window_ends_at: int | None
    ) -> None:
        """Give a claim back: the previous startedAt and windowEndsAt (or none)."""
        for attr, name, value in (("startedAt", ":prev", started_at), ("windowEndsAt", ":prevEnd", window_ends_at)):
            if value is None:
                removes.append(attr)
            else:
                sets.append(f"{attr} = {name}")
                values[name] = _n(value)

    @staticmethod
    def _waiting(sets: list[str], values: dict[str, Any], waiting: Waiting | None, *, since: str) -> None:
        """Register the key as waiting for build budget (the `waiting` index), since `since`."""
        if waiting is None:
            return
        sets += ["waitScope = :scope", f"waitingSince = {since}", "waitingUntil = :wuntil"]
        values.update({":scope": _s(WAIT_SCOPE), ":wuntil": _n(waiting.until)})

    @staticmethod
    def _expression(sets: list[str], removes: list[str]) -> str:
        return ("SET " + ", ".join(sets) if sets else "") + (" REMOVE " + ", ".join(removes) if removes else "")

    def release(
        self,
        key: RefreshKey,
        *,
        claim_token: str,
        previous_started_at: int | None,
        previous_window_ends_at: int | None = None,
        previous_pending_since: int | None = None,
    ) -> bool:
        values: dict[str, Any] = {":claim": _s(claim_token)}
        sets: list[str] = []
        removes = ["claimToken"]
        self._restore(sets, removes, values, previous_started_at, previous_window_ends_at)
        if previous_pending_since is not None:
            sets.append("pendingSince = :prevPending")
            values[":prevPending"] = _n(previous_pending_since)
        return self._update(key, self._expression(sets, removes), "claimToken = :claim", values).ok

    def requeue_trailing(
        self,
        key: RefreshKey,
        *,
        claim_token: str,
        trailing_token: str,
        previous_started_at: int | None,
        previous_window_ends_at: int | None,
        now: int,
        due_at: int,
        waiting: Waiting,
    ) -> bool:
        values: dict[str, Any] = {
            ":claim": _s(claim_token),
            ":tt": _s(trailing_token),
            ":scheduled": _s("scheduled"),
            ":due": _n(due_at),
            ":now": _n(now),
        }
        sets = [
            "trailingState = :scheduled",
            "trailingDueAt = :due",
            "dirtyAt = :now",
            "pendingSince = if_not_exists(pendingSince, :now)",
        ]
        removes = ["claimToken"]
        self._restore(sets, removes, values, previous_started_at, previous_window_ends_at)
        self._waiting(sets, values, waiting, since="if_not_exists(pendingSince, :now)")
        condition = "claimToken = :claim AND trailingToken = :tt"
        result = self._update(key, self._expression(sets, removes), condition, values)
        st = result.state
        if result.ok or st is None or st.claim_token != claim_token or st.trailing_token in (None, trailing_token):
            return result.ok
        if st.trailing_state != "scheduled":
            return False
        return self._requeue_replaced(
            key,
            st,
            claim_token=claim_token,
            previous_started_at=previous_started_at,
            previous_window_ends_at=previous_window_ends_at,
            waiting=waiting,
        )

    def _requeue_replaced(
        self,
        key: RefreshKey,
        st: KeyState,
        *,
        claim_token: str,
        previous_started_at: int | None,
        previous_window_ends_at: int | None,
        waiting: Waiting,
    ) -> bool:
        """The deferred claim's trailing refresh was replaced by a newer mutation's (as `st` read):
        give the claim back, keep the replacement, and lower its pendingSince to the oldest of its own
        and the claim's (`waiting.since`): the claim posted nothing. The condition pins what the min
        was computed from (a scheduled refresh's pendingSince does not change: joins keep it)."""
        since = min(st.pending_since, waiting.since) if st.pending_since is not None else waiting.since
        values: dict[str, Any] = {
            ":claim": _s(claim_token),
            ":tt": _s(st.trailing_token or ""),
            ":scheduled": _s("scheduled"),
            ":since": _n(since),
        }
        sets = ["pendingSince = :since"]
        removes = ["claimToken"]
        self._restore(sets, removes, values, previous_started_at, previous_window_ends_at)
        self._waiting(sets, values, waiting, since=":since")
        condition = "claimToken = :claim AND trailingToken = :tt AND trailingState = :scheduled AND "
        if st.pending_since is None:
            condition += "attribute_not_exists(pendingSince)"
        else:
            condition += "pendingSince = :read"
            values[":read"] = _n(st.pending_since)
        return self._update(key, self._expression(sets, removes), condition, values).ok

    def join_trailing(
        self,
        key: RefreshKey,
        *,
        now: int,
        oldest_event_ms: int,
        trailing_token: str,
        expires_at: int,
        waiting: Waiting | None = None,
    ) -> WriteResult:
        values: dict[str, Any] = {
            ":now": _n(now),
            ":oldest": _n(oldest_event_ms),
            ":tt": _s(trailing_token),
            ":scheduled": _s("scheduled"),
            ":exp": _n(expires_at),
        }
        sets = ["dirtyAt = :now", "pendingSince = if_not_exists(pendingSince, :oldest)", "expiresAt = :exp"]
        self._waiting(sets, values, waiting, since="if_not_exists(pendingSince, :oldest)")
        result = self._update(
            key,
            self._expression(sets, []),
            "trailingToken = :tt AND trailingState = :scheduled AND (attribute_not_exists(dirtyAt) OR dirtyAt < :now)",
            values,
        )
        st = result.state
        if (
            not result.ok
            and st is not None
            and st.trailing_token == trailing_token
            and st.trailing_state == "scheduled"
            and st.dirty_at is not None
            and st.dirty_at >= now
        ):
            if waiting is not None:  # still register the key as waiting
                register: list[str] = []
                more: dict[str, Any] = {":tt": _s(trailing_token), ":oldest": _n(oldest_event_ms)}
                self._waiting(register, more, waiting, since="if_not_exists(pendingSince, :oldest)")
                self._update(key, self._expression(register, []), "trailingToken = :tt", more)
            return WriteResult(True, st)  # a later mutation is already recorded: it covers ours
        return result

    def schedule_trailing(
        self,
        key: RefreshKey,
        *,
        now: int,
        oldest_event_ms: int,
        trailing_token: str,
        due_at: int,
        replaces: str | None,
        expires_at: int,
        replaces_started_at: int | None = None,
        waiting: Waiting | None = None,
    ) -> WriteResult:
        # Replacing a running trailing refresh that may have died: mark the key dirty no earlier
        # than that claim, so the new trailing refresh runs even if the old claim never reached Cube.
        dirty = max(now, replaces_started_at or 0) if replaces else now
        values = {
            ":now": _n(dirty),
            ":oldest": _n(oldest_event_ms),
            ":tt": _s(trailing_token),
            ":scheduled": _s("scheduled"),
            ":due": _n(due_at),
            ":exp": _n(expires_at),
            **self._ident(key),
        }
        pending = ":oldest" if replaces else "if_not_exists(pendingSince, :oldest)"
        sets = [
            "dirtyAt = :now",
            f"pendingSince = {pending}",
            "trailingToken = :tt",
            "trailingState = :scheduled",
            "trailingDueAt = :due",
            "expiresAt = :exp",
            "tenantId = :tenant",
            "#t = :target",
        ]
        self._waiting(sets, values, waiting, since=pending)
        update = self._expression(sets, [])
        if replaces is None:
            condition = "attribute_not_exists(trailingToken)"
        else:
            condition = "trailingToken = :old AND trailingState = :running AND "
            if replaces_started_at is None:
                condition += "attribute_not_exists(startedAt)"
            else:
                condition += "startedAt = :seen"
                values[":seen"] = _n(replaces_started_at)
            values.update({":old": _s(replaces), ":running": _s("running")})
        return self._update(key, update, condition, values, {"#t": "target"})

    def reschedule_trailing(self, key: RefreshKey, *, trailing_token: str, due_at: int) -> bool:
        return self._update(
            key,
            "SET trailingDueAt = :due",
            "trailingToken = :tt AND (attribute_not_exists(trailingDueAt) OR trailingDueAt < :due)",
            {":tt": _s(trailing_token), ":due": _n(due_at)},
        ).ok

    def finish_trailing(self, key: RefreshKey, *, trailing_token: str) -> bool:
        return self._update(
            key,
            f"REMOVE trailingToken, trailingState, trailingDueAt, pendingSince, {_NOT_WAITING}",
            "trailingToken = :tt",
            {":tt": _s(trailing_token)},
        ).ok

    def drop_trailing(self, key: RefreshKey, *, trailing_token: str, dirty_at: int | None) -> bool:
        values = {":tt": _s(trailing_token), ":scheduled": _s("scheduled")}
        if dirty_at is None:
            unchanged = "attribute_not_exists(dirtyAt)"
        else:
            unchanged = "dirtyAt = :dirty"
            values[":dirty"] = _n(dirty_at)
        return self._update(
            key,
            f"REMOVE trailingToken, trailingState, trailingDueAt, pendingSince, {_NOT_WAITING}",
            f"trailingToken = :tt AND trailingState = :scheduled AND {unchanged}",
            values,
        ).ok

    def record_build(self, key: RefreshKey, record: BuildRecord) -> bool:
        values: dict[str, Any] = {
            ":start": _n(record.started_at),
            ":status": _s(record.status),
            ":seen": _n(record.seen_at),
            ":failures": _n(record.failures),
        }
        sets = ["buildStartedAt = :start", "buildStatus = :status", "buildSeenAt = :seen", "buildFailures = :failures"]
        removes = []
        optional: dict[str, tuple[str, dict[str, str] | None]] = {
            "freshnessLagMs": ("lag", _n(record.freshness_lag_ms) if record.freshness_lag_ms is not None else None),
            "buildFailureClass": ("cls", _s(record.failure_class) if record.failure_class else None),
            "buildError": ("err", _s(record.error) if record.error else None),
            "retriggerDueAt": ("due", _n(record.retrigger_due_at) if record.retrigger_due_at is not None else None),
        }
        for attr, (name, value) in optional.items():
            if value is None:
                removes.append(attr)
            else:
                sets.append(f"{attr} = :{name}")
                values[f":{name}"] = value
        if record.window_ms is not None:
            sets.append("windowMs = :wms")
            values[":wms"] = _n(record.window_ms)
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        condition = "attribute_exists(pk) AND (attribute_not_exists(buildStartedAt) OR buildStartedAt < :start)"
        return self._update(key, update, condition, values).ok

    def record_jobs(
        self, key: RefreshKey, *, started_at: int, tokens: Sequence[str], inflight_until: int | None = None
    ) -> bool:
        values: dict[str, Any] = {":start": _n(started_at), ":tokens": {"L": [_s(t) for t in tokens]}}
        update = "SET jobsStartedAt = :start, jobTokens = :tokens"
        if inflight_until is not None:
            update += f", inflightUntil = :until REMOVE queuedSeenAt, pollSeq, {_NOT_WAITING}"
            values[":until"] = _n(inflight_until)
        return self._update(
            key,
            update,
            "attribute_exists(pk) AND (attribute_not_exists(jobsStartedAt) OR jobsStartedAt < :start)",
            values,
        ).ok

    def observe_pending(
        self,
        key: RefreshKey,
        *,
        started_at: int,
        inflight_until: int,
        scheduled_at: int | None,
        poll_seq: int | None = None,
    ) -> bool:
        values: dict[str, Any] = {":start": _n(started_at), ":until": _n(inflight_until)}
        update = "SET inflightUntil = :until"
        if scheduled_at is not None:
            update += ", queuedSeenAt = :seen"
            values[":seen"] = _n(scheduled_at)
        if poll_seq is not None:
            update += ", pollSeq = :seq"
            values[":seq"] = _n(poll_seq)
        condition = "jobsStartedAt = :start AND attribute_exists(inflightUntil)"
        return self._update(key, update, condition, values).ok

    def clear_inflight(self, key: RefreshKey, *, started_at: int) -> bool:
        return self._update(
            key,
            "REMOVE inflightUntil, queuedSeenAt, pollSeq",
            "jobsStartedAt = :start",
            {":start": _n(started_at)},
        ).ok

    def waiters(self, scope: str, *, now: int, limit: int) -> list[Waiter]:
        """The `waiting` index, oldest first; lapsed registrations are filtered (DynamoDB applies
        `Limit` before the filter, so pages are read until `limit` live ones or a bound)."""
        if limit <= 0:
            return []
        args: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": WAITING_INDEX,
            "KeyConditionExpression": "waitScope = :scope",
            "FilterExpression": "waitingUntil > :now",
            "ExpressionAttributeValues": {":scope": _s(scope), ":now": _n(now)},
            "Limit": max(limit, 25),
        }
        found: list[Waiter] = []
        try:
            for _ in range(4):
                page = self.client.query(**args)
                for item in page.get("Items", []):
                    token = item.get("trailingToken", {}).get("S")
                    due = item.get("trailingDueAt", {}).get("N")
                    since = int(item["waitingSince"]["N"])
                    key = RefreshKey.from_pk(item["pk"]["S"])
                    found.append(Waiter(key, since, token, int(due) if due is not None else None))
                last = page.get("LastEvaluatedKey")
                if len(found) >= limit or not last:
                    break
                args["ExclusiveStartKey"] = last
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"DynamoDB query of waiting keys failed: {type(exc).__name__}") from exc
        return found[:limit]

    # -- build budget slots (docs/load-aware.md) -------------------------------------------------
    def budget_slots(self, scope: str, count: int) -> list[Slot]:
        if count <= 0:
            return []
        keys = [{"pk": _s(slot_pk(scope, i))} for i in range(count)]
        by_pk: dict[str, dict[str, Any]] = {}
        try:
            request: dict[str, Any] = {self.table: {"Keys": keys, "ConsistentRead": True}}
            for _ in range(5):
                response = self.client.batch_get_item(RequestItems=request)
                for item in response.get("Responses", {}).get(self.table, []):
                    by_pk[item["pk"]["S"]] = item
                request = response.get("UnprocessedKeys") or {}
                if not request:
                    break
            else:
                raise StoreUnavailable("DynamoDB left budget slots unread")
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"DynamoDB read of budget slots failed: {type(exc).__name__}") from exc
        slots = []
        for i in range(count):
            item = by_pk.get(slot_pk(scope, i)) or {}
            lease = item.get("lease", {}).get("S")
            until = item.get("leaseUntil", {}).get("N")
            holder = item.get("leaseKey", {}).get("S")
            slots.append(Slot(i, lease, int(until) if until is not None else None, holder))
        return slots

    def _slot(self, scope: str, index: int, update: str, condition: str, values: dict[str, Any]) -> bool:
        try:
            self.client.update_item(
                TableName=self.table,
                Key={"pk": _s(slot_pk(scope, index))},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return False
            raise StoreUnavailable(f"DynamoDB {exc.response.get('Error', {}).get('Code')}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"DynamoDB unreachable: {type(exc).__name__}") from exc
        return True

    def take_slot(self, scope: str, index: int, *, lease: str, key: str, now: int, until: int) -> bool:
        return self._slot(
            scope,
            index,
            "SET lease = :lease, leaseKey = :key, leaseUntil = :until",
            "attribute_not_exists(lease) OR leaseUntil <= :now",
            {":lease": _s(lease), ":key": _s(key), ":until": _n(until), ":now": _n(now)},
        )

    def renew_slot(self, scope: str, index: int, *, lease: str, until: int) -> bool:
        return self._slot(
            scope, index, "SET leaseUntil = :until", "lease = :lease", {":lease": _s(lease), ":until": _n(until)}
        )

    def free_slot(self, scope: str, index: int, *, lease: str) -> bool:
        return self._slot(scope, index, "REMOVE lease, leaseKey, leaseUntil", "lease = :lease", {":lease": _s(lease)})

    def record_part(self, key: RefreshKey, *, started_at: int, part: int) -> frozenset[int]:
        # Two conditional writes: add to the parts of this refresh, or start them (replacing an older
        # refresh's). Each is atomic; a lost race between them is retried.
        settled = "(attribute_not_exists(buildStartedAt) OR buildStartedAt < :start)"
        values = {":start": _n(started_at), ":part": {"NS": [str(part)]}}
        for _ in range(3):
            added = self._update(key, "ADD buildParts :part", f"buildPartsOf = :start AND {settled}", values)
            if added.ok:  # the item as it was before our atomic ADD, plus ours
                return (added.state.build_parts if added.state and added.state.build_parts else frozenset()) | {part}
            st = added.state
            if (
                st is None
                or (st.build_started_at is not None and st.build_started_at >= started_at)
                or (st.build_parts_of is not None and st.build_parts_of > started_at)
            ):
                return frozenset()
            started = self._update(
                key,
                "SET buildPartsOf = :start, buildParts = :part",
                f"attribute_exists(pk) AND (attribute_not_exists(buildPartsOf) OR buildPartsOf < :start) AND {settled}",
                values,
            )
            if started.ok:
                return frozenset({part})
        return frozenset()

    def get(self, key: RefreshKey) -> KeyState | None:
        try:
            response = self.client.get_item(TableName=self.table, Key={"pk": _s(key.pk)}, ConsistentRead=True)
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"DynamoDB read failed: {type(exc).__name__}") from exc
        return to_state(response.get("Item"))

    def scan(self, tenant_id: str | None = None) -> list[tuple[RefreshKey, KeyState]]:
        args: dict[str, Any] = {"TableName": self.table, "ConsistentRead": True}
        if tenant_id is not None:
            args["FilterExpression"] = "tenantId = :tenant"
            args["ExpressionAttributeValues"] = {":tenant": _s(tenant_id)}
        found: list[tuple[RefreshKey, KeyState]] = []
        try:
            for page in self.client.get_paginator("scan").paginate(**args):
                for item in page.get("Items", []):
                    if item["pk"]["S"].startswith(RESERVED_PREFIX):
                        continue  # a budget slot, not a refresh key
                    state = to_state(item)
                    if state is not None:
                        found.append((RefreshKey.from_pk(item["pk"]["S"]), state))
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"DynamoDB scan failed: {type(exc).__name__}") from exc
        return sorted(found)

    def delete(self, key: RefreshKey) -> None:
        try:
            self.client.delete_item(TableName=self.table, Key={"pk": _s(key.pk)})
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"DynamoDB delete failed: {type(exc).__name__}") from exc
