#!/bin/sh
# Install tierd from this checkout into its own virtual environment and link tierd and tierctl into /usr/local/bin
# (where systemd/tierd.service expects them). A venv, because Debian 12 and Ubuntu 24.04 refuse `pip install` into
# the system Python (externally-managed-environment), and tierd's packages should not mix with the distribution's.
# Environment: PREFIX (default /opt/tierd), BIN (default /usr/local/bin), PYTHON (default python3, >= 3.11).
set -eu

PREFIX=${PREFIX:-/opt/tierd}
BIN=${BIN:-/usr/local/bin}
PYTHON=${PYTHON:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install.sh: $PYTHON not found: install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: tierd needs Python >= 3.11; $PYTHON is $("$PYTHON" -c 'import platform; print(platform.python_version())')" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: installing python3-venv (Debian and Ubuntu ship venv's pip separately)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null
    else
        echo "install.sh: $PYTHON cannot create a virtual environment with pip: install python3-venv (as root)" >&2
        exit 1
    fi
fi

echo "install.sh: tierd into $PREFIX, commands linked into $BIN"
"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --disable-pip-version-check "$SRC"
mkdir -p "$BIN"
for cmd in tierd tierctl; do
    ln -sf "$PREFIX/bin/$cmd" "$BIN/$cmd"
done
"$BIN/tierd" --version
