#!/bin/sh
# Install what tools/guest.py needs to boot guests (idempotent; run as root; CI calls it before `guest.py test`):
#   Debian bookworm-backports (same URIs and keyring as the machine's Debian source) for qemu-system-x86 10.x and
#   linux-image-amd64 6.12.x (HMAT-aware memory tiers, CXL modules, DAMON), busybox-static, numactl, ndctl, daxctl;
#   from bookworm itself the newest linux-image-6.1.0-N-amd64 (the distribution's own kernel line, no DAMON, booted
#   with `guest.py --kernel 6.1`);
#   from PyPI: virtme-ng (vng) plus the Python packages the guest tests import.
# Environment: PYTHON (default python3) is the interpreter whose pip gets virtme-ng; the guest runs that same one.
set -eu

PYTHON=${PYTHON:-python3}
SUITE=bookworm-backports
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root (apt-get)" >&2
    exit 1
fi

have_suite() {
    grep -rqs -- "$SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

add_backports() {
    # Reuse the URI and keyring of the existing Debian "main" archive source (deb822 or one-line format).
    uri=""
    keyring=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        if grep -q '^Suites:.*bookworm' "$f" && grep -q '^URIs:.*/debian/\?$' "$f"; then
            uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' "$f" | grep -v security | head -n1)
            keyring=$(sed -n 's/^Signed-By:[[:space:]]*\(.*\)/\1/p' "$f" | head -n1)
            [ -n "$uri" ] && break
        fi
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\/debian\/\?\)[[:space:]]\+bookworm[[:space:]].*/\2/p' \
            /etc/apt/sources.list | head -n1)
    fi
    if [ -z "$uri" ]; then
        echo "setup.sh: no Debian bookworm archive in this machine's apt sources (/etc/apt/sources.list," >&2
        echo "  /etc/apt/sources.list.d/*.sources), so there is no mirror to take $SUITE from. Add a bookworm" >&2
        echo "  source for your mirror (or $SUITE itself) and run setup.sh again." >&2
        exit 1
    fi
    keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
    echo "setup.sh: adding $SUITE from $uri (keyring $keyring)"
    cat > /etc/apt/sources.list.d/backports.sources <<EOF
Types: deb
URIs: $uri
Suites: $SUITE
Components: main
Signed-By: $keyring
EOF
}

need_apt=0
ls /boot/vmlinuz-6.1[2-9]* >/dev/null 2>&1 || need_apt=1
ls /boot/vmlinuz-6.1.0-* >/dev/null 2>&1 || need_apt=1
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1)
[ "${qemu_major:-0}" -ge 9 ] || need_apt=1
for tool in busybox numactl ndctl daxctl; do
    command -v "$tool" >/dev/null 2>&1 || need_apt=1
done

if [ "$need_apt" -eq 1 ]; then
    have_suite || add_backports
    apt-get update -q
    apt-get install -y -q -t "$SUITE" qemu-system-x86 linux-image-amd64
    apt-get install -y -q busybox-static numactl ndctl daxctl
    if ! ls /boot/vmlinuz-6.1.0-* >/dev/null 2>&1; then
        k61=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -n1)
        if [ -z "$k61" ]; then
            echo "setup.sh: no linux-image-6.1.0-N-amd64 package in this machine's apt sources (bookworm)" >&2
            exit 1
        fi
        apt-get install -y -q --no-install-recommends "$k61"
    fi
else
    echo "setup.sh: kernels 6.12+ and 6.1, qemu ${qemu_major}, busybox, numactl, ndctl, daxctl already present"
fi

need_pip=0
"$PYTHON" -c 'import virtme_ng, pyudev, psutil, prometheus_client' >/dev/null 2>&1 || need_pip=1
pybin=$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")
command -v vng >/dev/null 2>&1 || [ -x "$pybin/vng" ] || need_pip=1
if [ "$need_pip" -eq 1 ]; then
    "$PYTHON" -m pip install -q virtme-ng psutil pyudev prometheus-client
else
    echo "setup.sh: virtme-ng and the guest's Python packages already installed"
fi

vng=$(command -v vng || echo "$pybin/vng")
kernel=$(ls /boot/vmlinuz-6.1[2-9]* 2>/dev/null | sort | tail -n1)
kernel61=$(ls /boot/vmlinuz-6.1.0-* 2>/dev/null | sort -V | tail -n1)
echo "setup.sh: ready: kernels $kernel and $kernel61, $(qemu-system-x86_64 --version | head -n1), $("$vng" --version)"
