#!/usr/bin/env bash
# Installs smallbatch-rs the ways its users do, each into a fresh virtual environment, and checks
# that what got installed works (run by `make test`, after pytest):
#   a. maturin build --release -o dist: the abi3 wheel
#   b. that wheel, pip install --no-deps'd into a fresh environment
#   c. pip install . from this repository (build isolation: pip fetches maturin) into another one
#   d. in each: smallbatch_rs comes from that environment, AdamW and SGD train a small model, and
#      the smallbatch-rs command in its bin/ runs
# torch is several GB, so the fresh environments do not download it: a .pth file in their
# site-packages appends a view of the dev venv's site-packages to sys.path: a folder of symbolic
# links to everything there except smallbatch_rs (its editable install's .pth and dist-info) and
# pip. Python does not process .pth files of a folder a .pth file appends, so nothing there runs.
# cargo reuses target/ (or $CARGO_TARGET_DIR): the wheels build from its cache.
#
# Environment: VENV (default .venv, relative to the repository or absolute), the dev virtual
# environment with maturin and torch; CARGO_TARGET_DIR, as cargo reads it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
venv=${VENV:-.venv}
case "$venv" in /*) ;; *) venv="$root/$venv" ;; esac
dev_python="$venv/bin/python"
maturin="$venv/bin/maturin"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONNOUSERSITE=1
unset PYTHONPATH VIRTUAL_ENV

say() { echo "install-check: $*"; }
die() { echo "install-check: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

[ -x "$dev_python" ] || die "no dev virtual environment at $venv (run make build first)"
[ -x "$maturin" ] || die "no maturin in $venv/bin (it comes with requirements-dev.txt)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/smallbatch-install-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"  # nothing from the repository's python/ may be importable through the working directory

# The dev venv's site-packages as a view without smallbatch_rs.
dev_site=$("$dev_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
dev_platsite=$("$dev_python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
view="$tmp/dev-site"
mkdir "$view"
for site in "$dev_site" "$dev_platsite"; do
    for entry in "$site"/* "$site"/.[!.]*; do
        [ -e "$entry" ] || continue
        name=${entry##*/}
        case "$name" in
            smallbatch_rs | smallbatch_rs.* | smallbatch_rs-* | *.pth | pip | pip-* | __pycache__) continue ;;
        esac
        [ -e "$view/$name" ] || ln -s "$entry" "$view/$name"
    done
done
[ -e "$view/torch" ] || die "torch is not installed in $venv"

fresh_env() {  # fresh_env DIR: a new virtual environment that also sees the view
    "$dev_python" -m venv "$1"
    local site
    site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$view" >"$site/_smallbatch_install_check_dev_site.pth"
}

check_env() {  # check_env DIR: what a user of that environment does
    local env=$1
    (cd "$tmp" && "$env/bin/python" - "$env" "$root") <<'EOF' || die "the package installed in $env does not work (above)"
import importlib.metadata
import pathlib
import sys

import torch

import smallbatch_rs

env, repo = (pathlib.Path(p).resolve() for p in sys.argv[1:3])
for name, path in (("smallbatch_rs", smallbatch_rs.__file__), ("smallbatch_rs._core", smallbatch_rs._core.__file__),
                   ("its metadata", importlib.metadata.distribution("smallbatch-rs").locate_file("smallbatch_rs"))):
    path = pathlib.Path(path).resolve()
    assert env in path.parents, f"{name} comes from {path}, not from the fresh environment {env}"
    assert repo not in path.parents, f"{name} comes from the repository: {path}"
assert env not in pathlib.Path(torch.__file__).resolve().parents, "torch was installed again into the fresh environment"

torch.manual_seed(0)
x = torch.randn(256, 8)
y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
for cls, lr in ((smallbatch_rs.AdamW, 1e-2), (smallbatch_rs.SGD, 5e-2)):
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = cls(model.parameters(), lr=lr)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"{cls.__name__}: the loss did not fall: {losses}"
    print(f"  {cls.__name__}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 steps")
print(f"  smallbatch_rs {smallbatch_rs.__version__} from {pathlib.Path(smallbatch_rs.__file__).parent}, "
      f"SIMD {smallbatch_rs.backend_info()['simd']}; torch {torch.__version__} from the dev venv")
EOF
    local out
    out=$(cd "$tmp" && "$env/bin/smallbatch-rs" halflife --t-half 10M --seq-len 512 --batch-size 1) \
        || die "$env/bin/smallbatch-rs halflife failed"
    grep -q "0.999965" <<<"$out" || die "$env/bin/smallbatch-rs halflife printed an unexpected table: $out"
    echo "  smallbatch-rs halflife: beta2 0.999965 for a 10M-token half-life at 512 tokens per step"
}

total=$(now)

say "a. building the abi3 wheel (maturin build --release -o dist)"
start=$(now)
mkdir -p "$root/dist"
stamp="$tmp/build-started"
touch "$stamp"
# For the dev venv's interpreter, as `make build` (maturin develop) builds: cargo reuses its work.
(cd "$root" && VIRTUAL_ENV="$venv" "$maturin" build --release -o dist) || die "maturin build failed"
wheels=()
while IFS= read -r -d '' w; do wheels+=("$w"); done \
    < <(find "$root/dist" -maxdepth 1 -name 'smallbatch_rs-*.whl' -newer "$stamp" -print0)
[ "${#wheels[@]}" -eq 1 ] || die "expected one new wheel in dist/, found ${#wheels[@]}"
wheel=${wheels[0]}
case "${wheel##*/}" in *-abi3-*) ;; *) die "not an abi3 wheel: ${wheel##*/}" ;; esac
part_a=$(took "$start")
say "a. built dist/${wheel##*/} in $part_a"

say "b. installing that wheel into a fresh environment (pip install --no-deps)"
start=$(now)
fresh_env "$tmp/wheel-env"
"$tmp/wheel-env/bin/python" -m pip install --quiet --no-deps "$wheel" || die "pip install of the wheel failed"
check_env "$tmp/wheel-env"
part_b=$(took "$start")
say "b. the wheel works in a fresh environment ($part_b)"

say "c. pip install . from the repository into a fresh environment"
start=$(now)
fresh_env "$tmp/source-env"
"$tmp/source-env/bin/python" -m pip install --quiet "$root" || die "pip install . failed"
check_env "$tmp/source-env"
part_c=$(took "$start")
say "c. pip install . works in a fresh environment ($part_c)"

say "passed in $(took "$total"): a. wheel $part_a, b. wheel install and checks $part_b, c. pip install . and checks $part_c"
