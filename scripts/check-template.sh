#!/usr/bin/env bash
# Checks template.yaml the way CI does: SAM validation (translator + cfn-lint), a Docker-free
# `sam build`, and checkov. Exits non-zero on the first failure. No AWS credentials are needed.
#
#   scripts/check-template.sh            # everything
#   SKIP_BUILD=1 scripts/check-template.sh   # validation and checkov only
#
# Tool versions are pinned in tools/sam-requirements.txt and tools/checkov-requirements.txt; each
# lives in its own venv (.venv-sam, .venv-checkov) because their dependency pins conflict. The venvs
# are created when missing and refreshed when their requirements file changes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TEMPLATE="${TEMPLATE:-template.yaml}"
BUILD_DIR="${BUILD_DIR:-.aws-sam/check-build}"
CACHE_DIR="${CACHE_DIR:-.aws-sam/check-cache}"
export SAM_CLI_TELEMETRY=0
# sam validate needs a region to build its translator, never credentials (docs/msk-event-source.md).
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

log() { printf '\n==> %s\n' "$*"; }

# ensure_venv <dir> <requirements file> <executable that must exist afterwards>
ensure_venv() {
  local dir="$1" req="$2" exe="$3" stamp="$1/.requirements.sha256" want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [[ -x "$dir/bin/$exe" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ -x "$dir/bin/$exe" && ! -f "$stamp" ]]; then
    # Created by hand or by an older script: trust it if it already satisfies the pins.
    if "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --dry-run -r "$req" 2>/dev/null \
      | grep -q "Would install"; then
      :
    else
      echo "$want" >"$stamp"
      return 0
    fi
  fi
  log "installing $req into $dir"
  [[ -x "$dir/bin/python" ]] || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
}

ensure_venv .venv-sam tools/sam-requirements.txt sam
ensure_venv .venv-checkov tools/checkov-requirements.txt checkov
SAM=.venv-sam/bin/sam
CHECKOV=.venv-checkov/bin/checkov

log "$("$SAM" --version)  /  checkov $("$CHECKOV" --version)"

# 0. Parameters (scripts/check_parameters.py): samconfig.toml overrides and every Default satisfy the
#    template's constraints; the constraints agree with the ranges AWS documents (boundary probes);
#    the trailing queue follows AWS's SQS guidance. sam validate looks at none of this.
log "parameters: samconfig overrides, defaults, AWS ranges, trailing queue"
PYTHONPATH=src:. .venv-sam/bin/python scripts/check_parameters.py "$TEMPLATE" samconfig.toml

# 1. Translator validation: catches unknown or misspelled event properties and missing required
#    ones (cfn-lint 1.58 does not look inside MSK event properties, docs/msk-event-source.md). samconfig.toml
#    sets `lint = true` for `sam validate`, which would silently turn this run into a second lint
#    run (observed with SAM CLI 1.170), so it reads an empty config file instead.
mkdir -p .aws-sam
EMPTY_CONFIG="$ROOT/.aws-sam/check-empty-samconfig.toml"  # absolute: sam resolves it next to the template
printf 'version = 0.1\n' >"$EMPTY_CONFIG"
log "sam validate ($TEMPLATE)"
"$SAM" validate --template-file "$TEMPLATE" --config-file "$EMPTY_CONFIG"

# 2. cfn-lint on the transformed template.
log "sam validate --lint ($TEMPLATE)"
"$SAM" validate --lint --template-file "$TEMPLATE"

# 3. Docker-free build (src/Makefile, with a CPython of the runtime's version found by
#    scripts/find-python.sh), then checks on the package that Lambda would run.
if [[ -z "${SKIP_BUILD:-}" ]]; then
  runtime="$(sed -n 's/^ *Runtime: *python\([0-9]*\.[0-9]*\) *$/\1/p' "$TEMPLATE" | head -n1)"
  [[ -n "$runtime" ]] || { echo "FAIL: cannot read the python Runtime from $TEMPLATE" >&2; exit 1; }
  cpy="cpython-${runtime/./}"
  log "sam build (no container, Python $runtime) -> $BUILD_DIR"
  "$SAM" build --template-file "$TEMPLATE" --build-dir "$BUILD_DIR" --cache-dir "$CACHE_DIR" --cached
  # Every compiled extension in the package must match the function's architecture and CPython
  # version, otherwise the function fails at import on Lambda (sam build without Docker picks wheels by
  # platform tag; a wrong tag or a source build on this machine would slip through unnoticed).
  arch="$(sed -n 's/^ *Architectures: *\[ *\([a-z0-9_]*\) *\].*/\1/p' "$TEMPLATE" | head -n1)"
  case "$arch" in
    arm64) tag=aarch64; machine='b7 00' ;;
    x86_64) tag=x86_64; machine='3e 00' ;;
    *) echo "FAIL: cannot read Architectures from $TEMPLATE (got '$arch')" >&2; exit 1 ;;
  esac
  pkg="$BUILD_DIR/RefreshFunction"
  find "$pkg" -path '*pydantic_core/_pydantic_core*.so' | grep -q . \
    || { echo "FAIL: pydantic_core extension missing from $pkg" >&2; exit 1; }
  bad=0; n=0
  while IFS= read -r so; do
    n=$((n + 1))
    case "$(basename "$so")" in
      *."$cpy"-"$tag"-linux-gnu.so|*.abi3.so) ;;
      *.so) echo "FAIL: $so is not tagged $cpy-$tag" >&2; bad=1 ;;
    esac
    [[ "$(od -An -tx1 -j18 -N2 "$so" | tr -s ' ' | sed 's/^ //;s/ $//')" == "$machine" ]] \
      || { echo "FAIL: $so is not an $arch ELF" >&2; bad=1; }
  done < <(find "$pkg" -name '*.so')
  [[ $bad -eq 0 ]] || exit 1
  echo "$n compiled extensions, all $arch ($cpy-$tag)"
  # Bytecode must ship (the code folder is read-only on Lambda) and must be the runtime's: a .pyc is
  # used only by the minor version that wrote it (name tag and magic number); any other is ignored and
  # the module is compiled from source at every cold start.
  "$(scripts/find-python.sh "$runtime")" - "$pkg" "$cpy" <<'PY'
import importlib.util, sys
from pathlib import Path
pkg, tag = Path(sys.argv[1]), sys.argv[2]
pycs = list(pkg.rglob("*.pyc"))
wrong = [p for p in pycs if not p.name.endswith(f".{tag}.pyc") or p.read_bytes()[:4] != importlib.util.MAGIC_NUMBER]
sources = [p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts]
missing = [s for s in sources if not (s.parent / "__pycache__" / f"{s.stem}.{tag}.pyc").exists()]
# Each .pyc names its source as Lambda will see it (src/Makefile): a build-folder path would make two
# builds of the same tree differ, and with them the function digest (docs/deploy.md section 3).
import marshal
leaked = [p for p in pycs if not marshal.loads(p.read_bytes()[16:]).co_filename.startswith("/var/task/")]
for p in leaked[:5]:
    print(f"FAIL: {p.relative_to(pkg)} records a build path, not /var/task/...", file=sys.stderr)
for p in wrong[:5]:
    print(f"FAIL: {p.relative_to(pkg)} is not {tag} bytecode (magic {p.read_bytes()[:4].hex()}, want {importlib.util.MAGIC_NUMBER.hex()})", file=sys.stderr)
for s in missing[:5]:
    print(f"FAIL: {s.relative_to(pkg)} ships without {tag} bytecode", file=sys.stderr)
if wrong or missing or leaked or not pycs:
    sys.exit(f"FAIL: {len(wrong)} .pyc files of another Python, {len(missing)} of {len(sources)} modules without bytecode, {len(leaked)} with a build path")
print(f"{len(pycs)} .pyc files, all {tag} (magic {importlib.util.MAGIC_NUMBER.hex()}) under /var/task, for all {len(sources)} modules")
PY
  [[ ! -e "$pkg/Makefile" ]] || { echo "FAIL: the build Makefile leaked into the package" >&2; exit 1; }
  echo "built package: $(du -sh "$pkg" | cut -f1)"
fi

# 3b. What CloudFormation receives: SAM's translator output for every value of the parameters that switch
#     branches, and for parameter-only changes (tests/template, on this venv's translator): no empty IAM
#     policy, no reference to a resource a condition removed, no Fn::Select out of range (CloudFormation
#     evaluates untaken Fn::If branches too), the dashboard body valid JSON listing every alarm, a new
#     version for a parameter-only change, docs/deploy.md section 7's steps. Only the template's own
#     tests run here, with the translator SAM CLI pins.
log "translated template: every branch, parameter-only changes, the mapping procedure (tests/template)"
.venv-sam/bin/python -m pytest tests/template -q -p no:cacheprovider

# 4. checkov: zero failed checks; the only accepted exceptions are inline skips in the template
#    (Metadata.checkov.skip with a comment saying why). checkov drops resources whose Condition is
#    false for the parameter defaults, so the S3 dead-letter variant is scanned from a copy whose
#    DeadLetterTarget default is s3.
run_checkov() {
  local file="$1" label="$2" out rc=0
  log "checkov ($label)"
  out="$("$CHECKOV" --file "$file" --framework cloudformation --compact --quiet --skip-download 2>&1)" || rc=$?
  printf '%s\n' "$out"
  # --quiet prints the summary and failures only; no summary means checkov could not parse the file.
  grep -qE '^Passed checks: [1-9]' <<<"$out" || { echo "FAIL: checkov scanned nothing in $file" >&2; exit 1; }
  if [[ $rc -ne 0 ]]; then
    echo "FAIL: checkov reported failed checks for $label (exit $rc)" >&2
    exit "$rc"
  fi
}
run_checkov "$TEMPLATE" "$TEMPLATE, DeadLetterTarget=kafka"

# variant <name> <parameter> <new default>: a copy of the template whose parameter default differs, so
# that checkov scans the resources of the other branch (checkov evaluates conditions with defaults).
variant() {
  local dst="$BUILD_DIR/../check-$1/template.yaml"
  mkdir -p "$(dirname "$dst")"
  "$PYTHON" - "$TEMPLATE" "$dst" "$2" "$3" <<'PY'
import re, sys
src, dst, name, value = sys.argv[1:]
text = open(src).read()
new, n = re.subn(rf"(\n  {name}:\n    Type: String\n    Default: )\S+\n", rf"\g<1>{value}\n", text)
if n != 1:
    sys.exit(f"cannot find the {name} default in {src}")
open(dst, "w").write(new)
PY
  printf '%s\n' "$dst"
}
run_checkov "$(variant s3 DeadLetterTarget s3)" "$TEMPLATE, DeadLetterTarget=s3"

# 5. The self-managed Kafka source (KafkaSource=self-managed): the same validation as the MSK default.
#    cfn-lint checks both branches of every Fn::If in step 2 already; this variant makes the
#    translator and checkov see the self-managed resources as the active ones.
SELF_MANAGED="$(variant self-managed KafkaSource self-managed)"
log "sam validate + --lint (KafkaSource=self-managed)"
"$SAM" validate --template-file "$SELF_MANAGED" --config-file "$EMPTY_CONFIG"
"$SAM" validate --lint --template-file "$SELF_MANAGED"
run_checkov "$SELF_MANAGED" "$TEMPLATE, KafkaSource=self-managed"

# 6. Without the Kafka mapping (KafkaMappingEnabled=false, docs/deploy.md section 7's middle step): cfn-lint
#    checks that nothing refers to the mapping or its alarms outside their condition; checkov sees that stack.
NO_MAPPING="$(variant no-mapping KafkaMappingEnabled '"false"')"
log "sam validate + --lint (KafkaMappingEnabled=false)"
"$SAM" validate --template-file "$NO_MAPPING" --config-file "$EMPTY_CONFIG"
"$SAM" validate --lint --template-file "$NO_MAPPING"
run_checkov "$NO_MAPPING" "$TEMPLATE, KafkaMappingEnabled=false"

log "all template checks passed"
