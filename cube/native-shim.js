// Preload for running Cube offline: node --require ./native-shim.js .../server.js
//
// Why: @cubejs-backend/native is published as JavaScript only; its Rust binary (index.node) comes
// from GitHub releases, which this machine cannot reach. Without it Cube 1.x cannot start: the API
// gateway sets up its logger through it, schema compilation creates a Jinja engine through it, and
// /v1/load formats its results through it (docs/local-stack-notes.md).
//
// What: if, and only if, the real binary fails to load, replace those entry points on the module's
// exports object with small JavaScript stand-ins. Cube's own modules call them as
// `(0, native_1.fn)(...)`, i.e. they look the property up at call time, so patching the shared
// (cached) exports object before the server starts is enough. Everything else in Cube (API gateway,
// jobs API, orchestrator, drivers, pre-aggregation builds) runs unchanged.
//
// What is lost without the binary: the SQL API (Postgres wire protocol), the Tesseract planner,
// Jinja/YAML models and Python config. The /v1/load JSON is produced by formatResult() below.
'use strict';

const path = require('path');

const native = require(require.resolve('@cubejs-backend/native', { paths: [__dirname] }));

function realBinaryLoads() {
  try {
    native.loadNative();
    return true;
  } catch (e) {
    return false;
  }
}

function unavailable(feature) {
  return () => {
    throw new Error(`${feature} needs the @cubejs-backend/native binary, which is not installed (devstack native-shim)`);
  };
}

// --- /v1/load result formatting (the Rust side's getFinalQueryResult) ---------------------------

// `raw` is what ResultWrapper.getRawData() hands over for driver results: a Buffer holding the JSON
// of {members: [alias...], columns: [[value...]...]}. Plain row arrays are accepted too.
function rowsFromRaw(raw) {
  if (Array.isArray(raw)) return raw;
  const { members, columns } = JSON.parse(Buffer.from(raw).toString('utf8'));
  const rowCount = members.length ? columns[0].length : 0;
  const rows = new Array(rowCount);
  for (let i = 0; i < rowCount; i++) {
    const row = {};
    for (let j = 0; j < members.length; j++) row[members[j]] = columns[j][i];
    rows[i] = row;
  }
  return rows;
}

// Time values come back as "YYYY-MM-DDTHH:mm:ss.SSS" (no zone), like Cube's own formatter.
function formatTime(value) {
  if (value === null || value === undefined) return value;
  const d = value instanceof Date ? value : new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`);
  return Number.isNaN(d.getTime()) ? value : d.toISOString().replace(/Z$/, '');
}

// Alias -> member name, time formatting, and the plain `Cube.dim` key next to `Cube.dim.granularity`
// for the query's time dimensions (what the native formatter does for the REST API).
function transformRows(td, rawRows) {
  const aliasMap = td.aliasToMemberNameMap || {};
  const annotation = td.annotation || {};
  const timeDims = (td.query && td.query.timeDimensions) || [];
  return rawRows.map((raw) => {
    const row = {};
    for (const [alias, value] of Object.entries(raw)) {
      const member = aliasMap[alias] || alias;
      const type = annotation[member] && annotation[member].type;
      const v = type === 'time' ? formatTime(value) : value;
      row[member] = v;
      const parts = member.split('.');
      if (parts.length === 3) {
        const base = `${parts[0]}.${parts[1]}`;
        if (timeDims.some((t) => t.dimension === base && t.granularity === parts[2]) && !(base in row)) {
          row[base] = v;
        }
      }
    }
    return row;
  });
}

function formatResult(td, raw, resultData) {
  const rows = transformRows(td || {}, rowsFromRaw(raw));
  if (td && td.resType === 'compact') {
    const members = rows.length ? Object.keys(rows[0]) : [];
    return { ...resultData, data: { members, dataset: rows.map((r) => members.map((m) => r[m])) } };
  }
  return { ...resultData, data: rows };
}

function toBuffer(obj) {
  return Buffer.from(JSON.stringify(obj));
}

// --- install --------------------------------------------------------------------------------

if (!realBinaryLoads()) {
  // Rust-side logging of the SQL API: there is no Rust side, so nothing to set up.
  native.setupLogger = () => {};
  native.resetLogger = () => {};
  // "Fallback build" is Cube's own notion of a reduced native module; it makes Cube refuse
  // Python config with a clear message instead of crashing.
  native.isFallbackBuild = () => true;
  native.redactSqlLiterals = (sql) => String(sql).replace(/'(?:[^']|'')*'/g, "'redacted'");

  native.getFinalQueryResult = async (td, raw, resultData) => toBuffer(formatResult(td, raw, resultData));
  native.getFinalQueryResultMulti = async (tds, raws, responseData) => toBuffer({
    ...responseData,
    results: responseData.results.map((r, i) => formatResult(tds[i], raws[i], r)),
  });

  // Schema compilation always creates a Jinja engine, but only uses it for .jinja / templated
  // YAML files. Hand out one that refuses to render: models in cube/model are JavaScript.
  native.NativeInstance.prototype.newJinjaEngine = () => ({
    loadTemplate: unavailable('Jinja templates'),
    renderTemplate: unavailable('Jinja templates'),
  });
  native.NativeInstance.prototype.loadPythonContext = unavailable('Python models');
  native.registerInterface = unavailable('The SQL API');
  native.execSql = unavailable('The SQL API');
  native.sql4sql = unavailable('The SQL API');
  native.rest4sql = unavailable('The SQL API');
  native.buildSqlAndParams = unavailable('The Tesseract planner (set CUBEJS_TESSERACT_SQL_PLANNER=false)');
  native.transpileJs = unavailable('Native transpilation (set CUBEJS_TRANSPILATION_NATIVE=false)');
  native.transpileYaml = unavailable('Native transpilation (set CUBEJS_TRANSPILATION_NATIVE=false)');

  // Once per process, not again in each worker thread that loads Cube's modules.
  // eslint-disable-next-line no-console
  if (require('worker_threads').isMainThread) console.warn(`[native-shim] @cubejs-backend/native binary not found; using JS stand-ins (${path.basename(__filename)})`);
}
