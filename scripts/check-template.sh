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

# 0. samconfig.toml: every parameter_overrides entry must name a template parameter and satisfy
#    its AllowedValues / AllowedPattern / MinValue / MaxValue (sam validate does not look at them).
log "samconfig.toml parameter_overrides vs $TEMPLATE parameters"
.venv-sam/bin/python - "$TEMPLATE" samconfig.toml <<'PY'
import re, sys, tomllib
from samtranslator.yaml_helper import yaml_parse
params = yaml_parse(open(sys.argv[1]).read())["Parameters"]
config = tomllib.load(open(sys.argv[2], "rb"))
errors, checked = [], 0
for env, commands in config.items():
    if not isinstance(commands, dict):
        continue
    overrides = commands.get("deploy", {}).get("parameters", {}).get("parameter_overrides", [])
    if isinstance(overrides, str):
        overrides = re.findall(r'(\S+?=(?:"[^"]*"|\S+))', overrides)
    for item in overrides:
        name, _, value = item.partition("=")
        value = value.strip('"')
        spec = params.get(name)
        checked += 1
        if spec is None:
            errors.append(f"[{env}] {name}: not a template parameter")
            continue
        values = value.split(",") if spec["Type"] == "CommaDelimitedList" else [value]
        for v in values:
            if "AllowedValues" in spec and v not in [str(a) for a in spec["AllowedValues"]]:
                errors.append(f"[{env}] {name}={v}: not in {spec['AllowedValues']}")
            if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], v):
                errors.append(f"[{env}] {name}={v}: does not match {spec['AllowedPattern']}")
            if spec["Type"] == "Number":
                n = float(v)
                if "MinValue" in spec and n < float(spec["MinValue"]):
                    errors.append(f"[{env}] {name}={v}: below {spec['MinValue']}")
                if "MaxValue" in spec and n > float(spec["MaxValue"]):
                    errors.append(f"[{env}] {name}={v}: above {spec['MaxValue']}")
    for name, spec in params.items():
        if overrides and "Default" not in spec and not any(o.startswith(name + "=") for o in overrides):
            errors.append(f"[{env}] required parameter {name} has no override")
print(f"{checked} overrides checked")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
PY

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

# 3. Docker-free build with the local python3.11 (the runtime must match the interpreter).
if [[ -z "${SKIP_BUILD:-}" ]]; then
  log "sam build (no container) -> $BUILD_DIR"
  "$SAM" build --template-file "$TEMPLATE" --build-dir "$BUILD_DIR" --cache-dir "$CACHE_DIR" --cached
  # Every compiled extension in the package must match the function's architecture and CPython 3.11,
  # otherwise the function fails at import on Lambda (sam build without Docker picks wheels by platform
  # tag; a wrong tag or a source build on this machine would slip through unnoticed).
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
      *.cpython-311-"$tag"-linux-gnu.so|*.abi3.so) ;;
      *.so) echo "FAIL: $so is not tagged cpython-311-$tag" >&2; bad=1 ;;
    esac
    [[ "$(od -An -tx1 -j18 -N2 "$so" | tr -s ' ' | sed 's/^ //;s/ $//')" == "$machine" ]] \
      || { echo "FAIL: $so is not an $arch ELF" >&2; bad=1; }
  done < <(find "$pkg" -name '*.so')
  [[ $bad -eq 0 ]] || exit 1
  echo "$n compiled extensions, all $arch (cpython-311-$tag)"
  # Bytecode must ship (src/Makefile): the code folder is read-only on Lambda.
  ls "$pkg"/handler/__pycache__/app.cpython-311.pyc "$pkg"/pydantic/__pycache__/main.cpython-311.pyc >/dev/null \
    || { echo "FAIL: the package ships no bytecode" >&2; exit 1; }
  [[ ! -e "$pkg/Makefile" ]] || { echo "FAIL: the build Makefile leaked into the package" >&2; exit 1; }
  echo "built package: $(du -sh "$pkg" | cut -f1)"
fi

# 3b. The dashboard body is a JSON string inside !Sub: nothing above parses it, CloudFormation only
#     would, at deploy time. Substitute every ${...} with a placeholder and parse it here.
log "dashboard body is valid JSON"
.venv/bin/python - "$TEMPLATE" <<'PY'
import json, re, sys
from pathlib import Path
sys.path.insert(0, ".")
from devstack.template import load_template
body = load_template(Path(sys.argv[1]))["Resources"]["Dashboard"]["Properties"]["DashboardBody"]
text = body["Fn::Sub"] if isinstance(body, dict) else body
text = text[0] if isinstance(text, list) else text
widgets = json.loads(re.sub(r"\$\{[^}]+\}", "1", text))["widgets"]
print(f"{len(widgets)} widgets")
PY

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
S3_VARIANT="$BUILD_DIR/../check-s3/template.yaml"
mkdir -p "$(dirname "$S3_VARIANT")"
"$PYTHON" - "$TEMPLATE" "$S3_VARIANT" <<'PY'
import re, sys
src, dst = sys.argv[1], sys.argv[2]
text = open(src).read()
new, n = re.subn(r"(\n  DeadLetterTarget:\n    Type: String\n    Default: )kafka\n", r"\1s3\n", text)
if n != 1:
    sys.exit("cannot find the DeadLetterTarget default in " + src)
open(dst, "w").write(new)
PY
run_checkov "$S3_VARIANT" "$TEMPLATE, DeadLetterTarget=s3"

log "all template checks passed"
