#!/usr/bin/env bash
# Make the development environment ready; cheap and quiet when it already is.
#   - checks for Python >= 3.11 (set PYTHON to choose one),
#   - installs the Debian packages in APT_PACKAGES that are missing,
#   - creates .venv and, whenever pyproject.toml or a lock file changed, installs
#     exactly the versions locked in requirements/ (hash-checked), then mpipeline
#     itself in editable mode, and removes any package the lock does not name.
#     llama-cpp-python compiles from source the first time (about 5 minutes on
#     2 cores; pip caches the wheel after that).
# scripts/lock refreshes the lock files; scripts/check-latest tries the newest versions.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages the project needs beyond Python itself (the wheels of every
# Python dependency are self-contained on x86-64 Linux). wrk is the HTTP load
# generator of `mpipeline bench --http`.
# build-essential and cmake compile llama-cpp-python (the local model worker);
# prometheus gives promtool and the server the observability tests run; openssl
# makes the TLS tests' certificates; chromium and chromium-driver run the web
# dashboard's browser test (Selenium drives Debian's chromedriver, so no browser
# is downloaded). Under CI=true a test that finds one of them missing fails
# instead of skipping (tests/conftest.py).
APT_PACKAGES=(wrk build-essential cmake prometheus openssl chromium chromium-driver)
# As root, the profiling tests drop CAP_SYS_PTRACE with capsh.
if [[ $(id -u) -eq 0 ]]; then
    APT_PACKAGES+=(libcap2-bin)
fi

VENV=.venv
STAMP="$VENV/.mpipeline-install.sha256"

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [[ -n "$candidate" ]] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install_apt_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    if [[ $(id -u) -eq 0 ]]; then
        echo "setup: installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq
        # No recommends: prometheus would pull in a node exporter listening on :9100.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        # Debian starts an installed prometheus as a service on :9090, the
        # supervisor's default metrics port; the tests start their own.
        if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null 2>&1; then
            systemctl disable --now prometheus >/dev/null 2>&1 || true
        fi
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: run as root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
}

if ((${#APT_PACKAGES[@]} > 0)); then
    install_apt_packages
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! python=$(find_python); then
        echo "setup: Python 3.11 or newer is required; none found (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    echo "setup: creating $VENV with $python" >&2
    "$python" -m venv "$VENV"
    rm -f "$STAMP"
fi

BUILD_LOCK=requirements/build.txt
LOCK=requirements/all.txt
want=$(cat pyproject.toml "$BUILD_LOCK" "$LOCK" | sha256sum | cut -d' ' -f1)
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
    echo "setup: installing the locked dependencies ($LOCK) and mpipeline into $VENV" >&2
    pip=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
    # pip, setuptools and scikit-build-core first, at their locked versions, so
    # that nothing below is built with tools fetched unpinned into an isolated env.
    "${pip[@]}" install --require-hashes -r "$BUILD_LOCK"
    # A portable CPU build of llama.cpp: the default -march=native build died
    # with a general-protection fault in libggml-cpu on our CI machines, and
    # AVX-512 is missing on many of them.
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX512=OFF}" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "${pip[@]}" install --require-hashes --no-build-isolation -r "$LOCK"
    # -qq: setuptools' "Editable installation" notice is no news here; errors still show.
    "${pip[@]}" --quiet install --no-deps --no-build-isolation -e .
    # Exactly the lock: drop what an earlier install or a developer left behind.
    unlocked=$("$VENV/bin/python" scripts/_lockinfo.py unlocked "$BUILD_LOCK" "$LOCK")
    if [[ -n "$unlocked" ]]; then
        mapfile -t extra <<<"$unlocked"
        echo "setup: removing packages the lock does not name: ${extra[*]}" >&2
        "${pip[@]}" uninstall --yes "${extra[@]}"
    fi
    echo "$want" >"$STAMP"
fi
