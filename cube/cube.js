// Cube configuration for the local dev stack (devstack). Multi-tenant the way the product expects:
// every compiled model, query and pre-aggregation belongs to exactly one tenant, taken from the
// security context. A context without a tenantId is refused rather than silently compiled into a
// model that spans every tenant (docs/cube-jobs-api.md, hazard a).

// A UserError makes the API answer 400 (a client mistake the caller must not retry) instead of 500.
const { UserError } = require('@cubejs-backend/api-gateway');

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
