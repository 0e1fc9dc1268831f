// Users of a tenant. `dailyStatusCounts` is the partitioned rollup the refresh Lambda rebuilds; for
// tenant-h (30 months of seeded history) it has about 31 monthly partitions, which is where the
// partition-precise refresh is shown (only the partitions a mutation touched are rebuilt).
cube('Users', {
  sql: `SELECT * FROM public.users WHERE ${SECURITY_CONTEXT.tenantId.filter('tenant_id')}`,

  measures: {
    count: { type: 'count' },
    activeCount: { type: 'count', filters: [{ sql: `${CUBE}.status = 'active'` }] },
    inactiveCount: { type: 'count', filters: [{ sql: `${CUBE}.status = 'inactive'` }] },
  },

  dimensions: {
    id: { sql: 'id', type: 'string', primaryKey: true, shown: true },
    tenantId: { sql: 'tenant_id', type: 'string' },
    status: { sql: 'status', type: 'string' },
    createdAt: { sql: 'created_at', type: 'time' },
  },

  preAggregations: {
    main: {
      measures: [CUBE.count],
      dimensions: [CUBE.status],
      // A constant key: Cube never decides on its own that a rollup is stale. Rebuilds happen only
      // when the jobs API asks for them (there is no refresh worker either).
      refreshKey: { sql: 'SELECT 0' },
    },
    dailyStatusCounts: {
      measures: [CUBE.count, CUBE.activeCount, CUBE.inactiveCount],
      dimensions: [CUBE.status],
      timeDimension: CUBE.createdAt,
      granularity: 'day',
      partitionGranularity: 'month',
      // Without this the newest partition is clipped at a cached MAX(created_at) and a forced
      // rebuild can omit the newest rows (docs/cube-jobs-api.md, hazard e).
      buildRangeEnd: { sql: "SELECT NOW() + INTERVAL '1 day'" },
      refreshKey: { sql: 'SELECT 0' },
    },
  },
});
