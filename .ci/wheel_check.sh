#!/usr/bin/env bash
# CI: the wheel alone runs `diffssl reproduce`. Build the wheel, install it into a fresh virtualenv, and from a
# folder outside the checkout list the configs and dry-run one config per code path (DRY_RUN_CONFIGS=all: every one).
#
# The wheel goes in with --no-deps; its dependencies come from ./.venv (install.sh installed them from the same
# pyproject.toml) through a path line in the fresh venv, and `pip check` confirms they satisfy the wheel's
# requirements. Installing them again would copy ~6 GB (the CUDA torch build) for nothing the tests lack. The
# package itself, its configs and the `diffssl` command come from the wheel only: checked below.
# PYTHON: the interpreter whose environment provides the dependencies (default ./.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
PYTHON="${PYTHON:-.venv/bin/python}"
started=$SECONDS
work="$(mktemp -d "${TMPDIR:-/tmp}/diffssl-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src" "$work/dist" "$work/run" "$work/logs"

quiet() {  # run a command, its output to a log shown only when it fails
  local log="$work/logs/$1.log"
  shift
  "$@" > "$log" 2>&1 || { cat "$log"; echo "wheel check: failed: $*" >&2; return 1; }
}

# build from a copy of the tracked (and untracked, not ignored) files: a stale build/ or *.egg-info in the
# checkout cannot leak into the wheel, and the checkout stays untouched
git ls-files -z --cached --others --exclude-standard \
  | tar --null --files-from=- --ignore-failed-read -cf - | tar -xf - -C "$work/src"
quiet build "$PYTHON" -m pip wheel --no-deps --wheel-dir "$work/dist" "$work/src"
wheel=("$work"/dist/diffssl_plugin-*.whl)
echo "built $(basename "${wheel[0]}") ($((SECONDS - started)) s)"

"$PYTHON" -m venv --without-pip "$work/venv"  # nothing but the wheel: pip runs from outside it
deps="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$site/dependencies-from-ci-venv.pth"  # a plain path: that folder's own .pth files stay unread
quiet install "$PYTHON" -m pip --python "$work/venv/bin/python" install --no-deps "${wheel[0]}"
quiet pip-check "$PYTHON" -m pip --python "$work/venv/bin/python" check
echo "installed into a fresh virtualenv; pip check: its requirements are met ($((SECONDS - started)) s)"

# everything below runs from outside the checkout, with nothing of the checkout on the path
cd "$work/run"
unset PYTHONPATH
export PYTHONNOUSERSITE=1
"$work/venv/bin/python" - "$work/venv" "$repo/diffssl_plugin/configs" <<'EOF'
import sys
from importlib.metadata import distribution
from pathlib import Path

import diffssl_plugin
from diffssl_plugin.published import config_names

venv, checkout_configs = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
where = Path(diffssl_plugin.__file__).resolve()
assert venv in where.parents, f"diffssl_plugin comes from {where}, not from the wheel installed in {venv}"
metadata = Path(distribution("diffssl-plugin").locate_file("")).resolve()
assert venv in metadata.parents, f"the diffssl-plugin metadata read is in {metadata}, not in {venv}"
shipped, expected = config_names(), sorted(p.stem for p in checkout_configs.glob("*.yaml"))
assert shipped == expected, f"the wheel ships configs {shipped}, the checkout has {expected}"
print(f"diffssl_plugin from {where.parent}; {len(shipped)} configs shipped")
EOF
names=$("$work/venv/bin/python" -c "from diffssl_plugin.published import config_names; print(*config_names())")
"$work/venv/bin/diffssl" reproduce --list > "$work/logs/list.md"
for name in $names; do
  grep -q "^| $name |" "$work/logs/list.md" || { cat "$work/logs/list.md"; echo "--list lacks $name" >&2; exit 1; }
done
echo "diffssl reproduce --list: all $(wc -w <<< "$names") configs"

# Dry runs from the wheel: one config per code path the wheel must carry (a trained baseline, a DDAE U-Net, an
# eval-only ADM checkpoint with a head). The test suite dry-runs all ten configs from the checkout
# (tests/test_reproduce.py), and every config is checked above to be shipped and listed: repeating the other seven
# here took ~2 of CI's 20 minutes. DRY_RUN_CONFIGS=all runs every config.
if [ "${DRY_RUN_CONFIGS:-}" = all ]; then
  dry_names=$names
else
  dry_names="${DRY_RUN_CONFIGS:-simclr_cifar10 ddae_tiny_imagenet diffssl_attention_imagenet}"
fi
for name in $dry_names; do
  grep -qw "$name" <<< "$names" || { echo "wheel check: $name is not a shipped config" >&2; exit 1; }
done
# the dry runs are independent: two at a time, one thread each (this machine kind has 2 cores)
dry_run() {
  local name=$1 t0=$SECONDS log="$work/logs/$1.log"
  if OMP_NUM_THREADS=1 "$work/venv/bin/diffssl" reproduce "$name" --dry-run --no-progress --out "$work/run/$name" \
       > "$log" 2>&1 && [ -s "$work/run/$name/records.jsonl" ]; then
    echo "diffssl reproduce $name --dry-run: ok ($((SECONDS - t0)) s)"
  else
    cat "$log"; echo "wheel check: diffssl reproduce $name --dry-run failed or wrote no records" >&2; return 1
  fi
}
export -f dry_run
export work
printf '%s\n' $dry_names | xargs -P "${DRY_RUN_JOBS:-2}" -I{} bash -c 'dry_run "$1"' _ {}
echo "wheel check passed in $((SECONDS - started)) s"
