// Tenants: a tenant sees only its own row.
cube('Tenants', {
  sql: `SELECT * FROM public.tenants WHERE ${SECURITY_CONTEXT.tenantId.filter('id')}`,

  measures: {
    count: { type: 'count' },
  },

  dimensions: {
    id: { sql: 'id', type: 'string', primaryKey: true, shown: true },
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
