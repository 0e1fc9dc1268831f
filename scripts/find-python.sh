#!/usr/bin/env bash
# Prints the path of a CPython interpreter of the given minor version (default 3.13, the function's
# runtime), or one line saying how to get one and exits 1. Looks at PYTHON<major><minor> (e.g.
# PYTHON313=/opt/py/bin/python3.13), `pythonX.Y` on PATH (skipping pyenv shims that are not
# activated), then pyenv's versions folder. Used by the Makefile (dev venv) and src/Makefile (build).
#
#   scripts/find-python.sh [3.13]
set -euo pipefail
want="${1:-3.13}"
var="PYTHON${want/./}"

works() { [[ -x "$1" ]] && [[ "$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" == "$want" ]]; }

candidates=()
[[ -n "${!var:-}" ]] && candidates+=("${!var}")
if command -v "python$want" >/dev/null 2>&1; then candidates+=("$(command -v "python$want")"); fi
for root in "${PYENV_ROOT:-}" "$HOME/.pyenv" /root/.pyenv /opt/pyenv; do
  [[ -n "$root" && -d "$root/versions" ]] || continue
  while IFS= read -r exe; do candidates+=("$exe"); done < <(ls -d "$root"/versions/"$want"*/bin/"python$want" 2>/dev/null | sort -rV)
done

for exe in "${candidates[@]}"; do
  if works "$exe"; then printf '%s\n' "$exe"; exit 0; fi
done
echo "no Python $want found (looked at \$$var, python$want on PATH, pyenv versions): install it (e.g. pyenv install $want) or set $var=/path/to/python$want" >&2
exit 1
