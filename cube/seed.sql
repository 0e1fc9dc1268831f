-- Sample source data for the local Cube (devstack). Re-runnable: drops and recreates the tables.
-- Timestamps are relative to now(), so the monthly partitions of Users.dailyStatusCounts always
-- cover the current month and a few before it.
DROP TABLE IF EXISTS users, groups, tenants;

CREATE TABLE tenants (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamp NOT NULL
);

CREATE TABLE users (
    id         text PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES tenants (id),
    status     text NOT NULL,
    created_at timestamp NOT NULL
);
CREATE INDEX users_tenant_created ON users (tenant_id, created_at);

CREATE TABLE groups (
    id         text PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES tenants (id),
    name       text NOT NULL,
    created_at timestamp NOT NULL
);
CREATE INDEX groups_tenant ON groups (tenant_id);

INSERT INTO tenants (id, name, created_at) VALUES
    ('tenant-a', 'Tenant A', date_trunc('second', now()::timestamp) - interval '120 days'),
    ('tenant-b', 'Tenant B', date_trunc('second', now()::timestamp) - interval '110 days'),
    ('tenant-1', 'Tenant One', date_trunc('second', now()::timestamp) - interval '100 days'),
    ('tenant-2', 'Tenant Two', date_trunc('second', now()::timestamp) - interval '100 days'),
    ('tenant-3', 'Tenant Three', date_trunc('second', now()::timestamp) - interval '100 days'),
    ('tenant-h', 'Tenant History', date_trunc('second', now()::timestamp) - interval '30 months');

-- users per tenant: tenant-a 60, tenant-b 40, tenant-1..3 20 each; spread over the last ~100 days
-- (newest a few hours old); status cycles active, active, inactive, pending.
INSERT INTO users (id, tenant_id, status, created_at)
SELECT
    t.id || '-user-' || lpad(n::text, 3, '0'),
    t.id,
    (ARRAY['active', 'active', 'inactive', 'pending'])[1 + n % 4],
    date_trunc('second', now()::timestamp) - interval '3 hours'
        - (n - 1) * (interval '100 days' / t.user_count)
FROM (VALUES ('tenant-a', 60), ('tenant-b', 40), ('tenant-1', 20), ('tenant-2', 20), ('tenant-3', 20))
    AS t (id, user_count)
CROSS JOIN LATERAL generate_series(1, t.user_count) AS n;

-- tenant-h has history: 600 users over the last 30 months (20 a month, the newest a few hours old),
-- so Users.dailyStatusCounts has about 31 monthly partitions for it. Partition-precise refreshes are
-- shown on this tenant (tests/integration/test_precise_refresh.py, make demo).
INSERT INTO users (id, tenant_id, status, created_at)
SELECT
    'tenant-h-user-' || lpad(n::text, 4, '0'),
    'tenant-h',
    (ARRAY['active', 'active', 'inactive', 'pending'])[1 + n % 4],
    date_trunc('second', now()::timestamp) - interval '3 hours' - (n - 1) * (interval '30 months' / 600)
FROM generate_series(1, 600) AS n;

INSERT INTO groups (id, tenant_id, name, created_at)
SELECT
    t.id || '-group-' || n,
    t.id,
    'Group ' || n,
    date_trunc('second', now()::timestamp) - n * interval '9 days'
FROM (VALUES ('tenant-a', 6), ('tenant-b', 4), ('tenant-1', 2), ('tenant-2', 2), ('tenant-3', 2))
    AS t (id, group_count)
CROSS JOIN LATERAL generate_series(1, t.group_count) AS n;

-- Cube creates a tenant's pre-aggregation schema on its first build, and two first builds at once
-- can race (400 duplicate key ... pg_namespace_nspname_index; docs/cube-jobs-api.md, hazard d). The
-- seeded tenants' schemas exist from the start, so a first refresh of them is not a coin toss. Tenants
-- that are not seeded (the race test's, the simulation's) still meet the race.
CREATE SCHEMA IF NOT EXISTS pre_aggregations_tenant_a;
CREATE SCHEMA IF NOT EXISTS pre_aggregations_tenant_b;
CREATE SCHEMA IF NOT EXISTS pre_aggregations_tenant_1;
CREATE SCHEMA IF NOT EXISTS pre_aggregations_tenant_2;
CREATE SCHEMA IF NOT EXISTS pre_aggregations_tenant_3;
CREATE SCHEMA IF NOT EXISTS pre_aggregations_tenant_h;

ANALYZE tenants;
ANALYZE users;
ANALYZE groups;
