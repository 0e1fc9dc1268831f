// Cube configuration for the local dev stack (devstack). Multi-tenant the way the product expects:
// every compiled model, query and pre-aggregation belongs to exactly one tenant, taken from the
// security context. A context without a tenantId is refused rather than silently compiled into a
// model that spans every tenant (docs/cube-jobs-api.md, hazard a).

// A UserError makes the API answer 400 (a client mistake the caller must not retry) instead of 500.
const { UserError } = require('@cubejs-backend/api-gateway');
const { FileRepository } = require('@cubejs-backend/shared');

// Benchmarks only (bench/bench_freshness.py and bench/sim/cube_worker_check.py run Cube's own refresh
// worker). Unset (tests, demo), the model is read as it is on disk and there is no refresh worker.
// - CUBE_MODEL_REFRESH_EVERY (e.g. "10 second"): every constant refresh key of cube/model is served
//   as a real one, of the kind CUBE_MODEL_REFRESH_KEY names (default `every`):
//     every        `{ every }`
//     sql          `{ every, sql: SELECT MAX(created_at) of the tenant's rows }` (one key per tenant)
//     filter       the same, and the partitioned rollup's key also filters on its partition
//                  (FILTER_PARAMS: Cube's "refreshing select partitions" recipe)
//     incremental  `{ every }`, and the partitioned rollup's key `{ every, incremental: true,
//                  updateWindow: CUBE_MODEL_UPDATE_WINDOW }` (default "7 day")
// - CUBE_REFRESH_TENANTS (comma-separated): the tenants the refresh worker builds for;
//   CUBE_REFRESH_TIMER_S: how often it runs (Cube's default: 30 s).
const REFRESH_EVERY = process.env.CUBE_MODEL_REFRESH_EVERY;
const REFRESH_KIND = process.env.CUBE_MODEL_REFRESH_KEY || 'every';
const UPDATE_WINDOW = process.env.CUBE_MODEL_UPDATE_WINDOW || '7 day';
const REFRESH_TENANTS = (process.env.CUBE_REFRESH_TENANTS || '').split(',').filter(Boolean);
const REFRESH_TIMER_S = Number(process.env.CUBE_REFRESH_TIMER_S || 0);
const REFRESH_KINDS = ['every', 'sql', 'filter', 'incremental'];
if (REFRESH_EVERY && !REFRESH_KINDS.includes(REFRESH_KIND)) {
  throw new Error(`CUBE_MODEL_REFRESH_KEY must be one of ${REFRESH_KINDS.join(', ')}, got ${REFRESH_KIND}`);
}

// The refresh key a constant key is replaced with. `source` is the cube's file: its table and tenant
// filter are read from its `sql` (`FROM public.<table> WHERE ${SECURITY_CONTEXT.tenantId.filter('<col>')}`).
function refreshKeyFor(source, cubeName, partitioned) {
  const every = `every: '${REFRESH_EVERY}'`;
  const found = /FROM (public\.\w+) WHERE \$\{SECURITY_CONTEXT\.tenantId\.filter\('(\w+)'\)\}/.exec(source);
  if (REFRESH_KIND === 'every' || !found) {
    if (REFRESH_KIND === 'incremental' && partitioned) {
      return `refreshKey: { ${every}, incremental: true, updateWindow: '${UPDATE_WINDOW}' }`;
    }
    return `refreshKey: { ${every} }`;
  }
  if (REFRESH_KIND === 'incremental') {
    return partitioned
      ? `refreshKey: { ${every}, incremental: true, updateWindow: '${UPDATE_WINDOW}' }`
      : `refreshKey: { ${every} }`;
  }
  const [, table, column] = found;
  const tenant = `\${SECURITY_CONTEXT.tenantId.filter('${column}')}`;
  const partition = REFRESH_KIND === 'filter' && partitioned
    ? ` AND \${FILTER_PARAMS.${cubeName}.createdAt.filter('created_at')}`
    : '';
  return `refreshKey: { ${every}, sql: \`SELECT MAX(created_at) FROM ${table} WHERE ${tenant}${partition}\` }`;
}

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
        const cubeName = (/cube\('(\w+)'/.exec(content) || [])[1];
        const source = content;
        // A pre-aggregation with partitionGranularity before its constant key is the partitioned one.
        content = content.replace(
          /(partitionGranularity: '\w+',[\s\S]*?)?refreshKey: \{ sql: 'SELECT 0' \}/g,
          (match, partitionedPart) => (partitionedPart || '') + refreshKeyFor(source, cubeName, !!partitionedPart),
        );
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
