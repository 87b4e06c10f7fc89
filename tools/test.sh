#!/usr/bin/env bash
# Set up a fresh machine and run every test: the unit tests on this host, then the guest tests in QEMU guests
# (one boot per topology). Exits non-zero on any failure, including "no tests ran" (pytest exit 5) and a guest
# that cannot boot.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -f tools/guest/setup.sh ]; then
    bash tools/guest/setup.sh          # apt (QEMU, the 6.12 and 6.1 kernels, numactl, daxctl), pip (virtme-ng)
fi
# promtool (Debian's prometheus package) checks the metrics exposition; systemd-analyze verifies the unit
need=""
command -v promtool >/dev/null 2>&1 || need="$need prometheus"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
if [ -n "$need" ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,guest,bench]'
python3 -c "import tierd, numpy, pydantic, pyudev, prometheus_client, psutil" # the install worked

echo "== type check"
python3 -m mypy tierd

echo "== unit tests (host)"
python3 -m pytest -q -p no:cacheprovider

if [ -f tools/guest.py ]; then
    echo "== guest tests (QEMU, every topology)"
    python3 tools/guest.py test
    echo "== guest tests on Debian bookworm's own kernel line (6.1: no DAMON), but tierd's own fault recovery"
    python3 tools/guest.py --kernel 6.1 test -t tiered -t two-socket -- -k "not lifecycle and not drain_faults"
    echo "== guest tests on Debian's 7.x line (trixie-backports, fetched, not installed): DAMON beside DAMON_STAT"
    python3 tools/guest/fetch_kernel.py
    python3 tools/guest.py --kernel 7 test -t tiered -- -k "damon or kernel_line"
fi
