#!/usr/bin/env bash
# The package as users get it: build the wheel, check it holds every module,
# install it NON-editable with its dependencies into a fresh virtual environment, then,
# from a folder outside the repository, import every module of the installed fastmlp and
# run a short `fastmlp train`. Usage: .ci/wheel_check.sh [REPO] (default: this repository).
set -euo pipefail
repo="$(cd "${1:-"$(dirname "$0")/.."}" && pwd)"
check="$(cd "$(dirname "$0")" && pwd)/wheel_check.py"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src" "$tmp/work"

# Build from a copy: setuptools reuses build/ in the source folder, and a module left there
# by an earlier build would land in the wheel. The copy has the files git tracks or does not
# ignore (a tracked file deleted here is skipped).
if git -C "$repo" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2> /dev/null) | tar -xf - -C "$tmp/src"
else
    tar -C "$repo" --exclude=.git --exclude=.venv --exclude=build --exclude=dist \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$tmp/src"
fi

python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip wheel -qq --no-deps -w "$tmp/wheel" "$tmp/src"
wheel="$(echo "$tmp"/wheel/fastmlp-*.whl)"
"$py" -I "$check" contents "$wheel" "$tmp/src"
"$py" -m pip install -qq "$wheel"
rm -rf "$tmp/src"

# From $tmp/work, with -I: neither the repository nor the script's folder is on sys.path.
cd "$tmp/work"
"$py" -I "$check" imports "$tmp/venv"
run="$tmp/work/run"
"$tmp/venv/bin/fastmlp" train --depth 2 --width 32 --steps 20 --eval-every 10 \
    --probe-every 10 --probe-size 50 --valid-size 100 --test-size 100 --device cpu \
    --no-progress --out "$run" > "$tmp/train.log" 2>&1 || {
    cat "$tmp/train.log"
    echo "FAIL fastmlp train exited non-zero" >&2
    exit 1
}
for file in config.json metrics.jsonl stats.jsonl checkpoint.pt; do
    [[ -s "$run/$file" ]] || {
        cat "$tmp/train.log"
        echo "FAIL fastmlp train wrote no $run/$file" >&2
        exit 1
    }
done
echo "fastmlp train: exit 0, run directory written ($(ls "$run" | tr '\n' ' '))"
echo "wheel check passed: $(basename "$wheel")"
