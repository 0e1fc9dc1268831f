// Groups of a tenant.
cube('Groups', {
  sql: `SELECT * FROM public.groups WHERE ${SECURITY_CONTEXT.tenantId.filter('tenant_id')}`,

  measures: {
    count: { type: 'count' },
  },

  dimensions: {
    id: { sql: 'id', type: 'string', primaryKey: true, shown: true },
    tenantId: { sql: 'tenant_id', type: 'string' },
    name: { sql: 'name', type: 'string' },
    createdAt: { sql: 'created_at', type: 'time' },
  },

  preAggregations: {
    main: {
      measures: [CUBE.count],
      dimensions: [CUBE.name],
      refreshKey: { sql: 'SELECT 0' },
    },
  },
});
