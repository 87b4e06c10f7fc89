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
    # The other kernel lines run what differs there, not everything again (CI time: each tierd start costs
    # 20-40 s under TCG). 6.1: no DAMON, so the daemon places with soft-dirty; HMAT outside the kernel's tiers;
    # no weighted interleave.
    echo "== guest tests on Debian bookworm's own kernel line (6.1: no DAMON, no weighted interleave)"
    python3 tools/guest.py --kernel 6.1 test -t tiered -- -k "not lifecycle and not drain_faults and not wake"
    python3 tools/guest.py --kernel 6.1 test -t two-socket -- -k "interleave or smoke"
    echo "== guest tests on Debian's 7.x line (trixie-backports, fetched, not installed): DAMON beside DAMON_STAT"
    python3 tools/guest/fetch_kernel.py
    python3 tools/guest.py --kernel 7 test -t tiered -- -k "test_damon_guest or kernel_line"
fi
