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

// Benchmark only (bench/bench_overload.py saturates Cube's build queue): CUBE_MODEL_BUILD_SLEEP_S (e.g.
// "0.5") makes every build of a `Users` rollup (its `CREATE TABLE ... AS SELECT`) wait that long in
// PostgreSQL (`pg_sleep` in an uncorrelated subquery, run once per statement and only when the statement
// is a CREATE TABLE), a stand-in for a warehouse whose builds take long without burning CPU here; and
// CUBE_BUILD_CONCURRENCY sets the pre-aggregation build queue's concurrency (without it Cube takes the
// driver's default: 2 for PostgreSQL). Unset, neither changes anything.
const BUILD_SLEEP_S = Number(process.env.CUBE_MODEL_BUILD_SLEEP_S || 0);
const BUILD_CONCURRENCY = Number(process.env.CUBE_BUILD_CONCURRENCY || 0);
const USERS_FROM = 'FROM public.users WHERE ';
const SLOW_BUILD =
  `(SELECT count(*) FROM pg_sleep(CASE WHEN current_query() ~* '^[[:space:]]*create[[:space:]]+table' ` +
  `THEN ${BUILD_SLEEP_S} ELSE 0 END)) = 1 AND `;

class BenchModelRepository extends FileRepository {
  async dataSchemaFiles(includeDependencies) {
    const files = await super.dataSchemaFiles(includeDependencies);
    return files.map((file) => {
      let { content } = file;
      if (REFRESH_EVERY) {
        content = content.replace(/refreshKey: \{ sql: 'SELECT 0' \}/g, `refreshKey: { every: '${REFRESH_EVERY}' }`);
      }
      if (BUILD_SLEEP_S > 0 && /cube\('Users'/.test(content)) {
        if (!content.includes(USERS_FROM)) {
          throw new Error(`CUBE_MODEL_BUILD_SLEEP_S: ${file.fileName} no longer contains "${USERS_FROM}"`);
        }
        content = content.replace(USERS_FROM, USERS_FROM + SLOW_BUILD);
      }
      return { ...file, content };
    });
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
  ...(REFRESH_EVERY || BUILD_SLEEP_S > 0 ? { repositoryFactory: () => new BenchModelRepository('model') } : {}),
  ...(BUILD_CONCURRENCY > 0
    ? { orchestratorOptions: { preAggregationsOptions: { queueOptions: { concurrency: BUILD_CONCURRENCY } } } }
    : {}),
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
