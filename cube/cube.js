// Cube configuration for the local dev stack (devstack). Multi-tenant the way the product expects:
// every compiled model, query and pre-aggregation belongs to exactly one tenant, taken from the
// security context. A context without a tenantId is refused rather than silently compiled into a
// model that spans every tenant (docs/cube-jobs-api.md, hazard a).

// A UserError makes the API answer 400 (a client mistake the caller must not retry) instead of 500.
const { UserError } = require('@cubejs-backend/api-gateway');
const { FileRepository } = require('@cubejs-backend/shared');

// Benchmark only (bench/bench_freshness.py runs Cube's own refresh worker beside this project's):
// CUBE_MODEL_REFRESH_EVERY (e.g. "10 second") serves cube/model with every constant refresh key
// replaced by `{ every: ... }`, and CUBE_REFRESH_TENANTS (comma-separated) lists the tenants the
// refresh worker builds for, CUBE_REFRESH_TIMER_S how often it runs (Cube's default: 30 s). Unset
// (tests, demo), the model is read as it is on disk and there is no refresh worker.
const REFRESH_EVERY = process.env.CUBE_MODEL_REFRESH_EVERY;
const REFRESH_TENANTS = (process.env.CUBE_REFRESH_TENANTS || '').split(',').filter(Boolean);
const REFRESH_TIMER_S = Number(process.env.CUBE_REFRESH_TIMER_S || 0);

class EveryRefreshKeyRepository extends FileRepository {
  async dataSchemaFiles(includeDependencies) {
    const files = await super.dataSchemaFiles(includeDependencies);
    return files.map((file) => ({
      ...file,
      content: file.content.replace(/refreshKey: \{ sql: 'SELECT 0' \}/g, `refreshKey: { every: '${REFRESH_EVERY}' }`),
    }));
  }
}

function sanitize(value) {
  return String(value).toLowerCase().replace(/[^a-z0-9_]/g, '_');
}

function requireTenant(securityContext) {
  const tenantId = securityContext && securityContext.tenantId;
  if (typeof tenantId !== 'string' || tenantId.trim() === '') {
    throw new UserError('securityContext.tenantId is required: the model refuses to build without a tenant');
  }
  return tenantId;
}

module.exports = {
  ...(REFRESH_EVERY ? { repositoryFactory: () => new EveryRefreshKeyRepository('model') } : {}),
  ...(REFRESH_TENANTS.length
    ? { scheduledRefreshContexts: async () => REFRESH_TENANTS.map((tenantId) => ({ securityContext: { tenantId } })) }
    : {}),
  ...(REFRESH_TIMER_S > 0 ? { scheduledRefreshTimer: REFRESH_TIMER_S } : {}),
  contextToAppId: ({ securityContext }) => `CUBE_APP_${sanitize(requireTenant(securityContext))}`,

  // One schema per tenant in the source database (CUBEJS_EXTERNAL_DEFAULT=false).
  preAggregationsSchema: ({ securityContext }) => `pre_aggregations_${sanitize(requireTenant(securityContext))}`,

  // The jobs scope is granted per token: only a JWT whose payload lists "jobs" in `scopes` may
  // call /v1/pre-aggregations/jobs. Everyone else gets the defaults (graphql, meta, data, sql).
  contextToApiScopes: async (securityContext, defaultScopes) => {
    const scopes = securityContext && Array.isArray(securityContext.scopes) ? securityContext.scopes : [];
    return scopes.includes('jobs') ? [...new Set([...defaultScopes, 'jobs'])] : defaultScopes;
  },
};
