#!/usr/bin/env python3
"""Fetch a newer Debian kernel line for the proving ground without installing it on the host.

    sudo python3 tools/guest/fetch_kernel.py                 # the newest 7.x amd64 kernel of trixie-backports
    sudo python3 tools/guest/fetch_kernel.py --line 7.3
    python3 tools/guest.py --kernel 7 run -t tiered -- uname -r

Debian ships kernels from 7.x on as linux-binary-V (vmlinuz), linux-modules-V and linux-base-V packages whose
dependencies bookworm cannot satisfy, so they are not installed: their contents are unpacked (``dpkg-deb -x``)
into /usr/lib/modules/V (vmlinuz, modules, modules.builtin: virtme-ng finds the modules of the kernel it boots
there) and ``depmod V`` indexes them. Nothing goes to /boot, so the host's boot loader and
guest.py's default 6.12 line do not see it.

Trust: the suite's InRelease is checked with gpgv against Debian's archive keyring, Packages.xz against the
SHA256 in it, and each package against the SHA256 and size in Packages. The mirror is the one in this machine's
apt sources (deb.debian.org when there is none). Exit codes: 0 fetched or already there, 1 on a failure (said
on stderr), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MODULES = Path("/usr/lib/modules")
#: The three packages a kernel V is made of from 7.x on (flavour amd64: not cloud, not rt).
PARTS = ("linux-binary-{v}", "linux-modules-{v}", "linux-base-{v}")


class FetchError(Exception):
    """A step failed: the message names what and where."""


def apt_mirror() -> str:
    """The Debian archive URI of this machine's apt sources (deb822 or one-line), else deb.debian.org."""
    files = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s", text, re.M):
            return m.group(1)
    return DEFAULT_MIRROR


def download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.read()
    except OSError as e:
        raise FetchError(f"{url}: {e}") from None


def verified_release(mirror: str, suite: str, workdir: Path) -> str:
    """The suite's InRelease text after gpgv checked its signature."""
    path = workdir / "InRelease"
    path.write_bytes(download(f"{mirror}/dists/{suite}/InRelease"))
    gpgv = subprocess.run(["gpgv", "--keyring", str(KEYRING), str(path)], capture_output=True, text=True)
    if gpgv.returncode != 0:
        raise FetchError(f"{mirror}/dists/{suite}/InRelease: bad signature for {KEYRING}:\n{gpgv.stderr.strip()}")
    return path.read_text()


def sha256_of(release: str, name: str) -> tuple[str, int]:
    """(SHA256, size) of ``name`` in the SHA256 section of a Release file."""
    section = release.split("SHA256:", 1)[-1]
    m = re.search(rf"^\s+([0-9a-f]{{64}})\s+(\d+)\s+{re.escape(name)}$", section, re.M)
    if m is None:
        raise FetchError(f"InRelease lists no SHA256 for {name}")
    return m.group(1), int(m.group(2))


def checked(data: bytes, sha256: str, size: int, what: str) -> bytes:
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise FetchError(f"{what}: size or SHA256 differs from the signed index ({len(data)} bytes, want {size})")
    return data


def stanzas(packages: str) -> dict[str, dict[str, str]]:
    """Package name -> its fields (the newest version when a name appears more than once)."""
    out: dict[str, dict[str, str]] = {}
    for block in packages.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", block, re.M))
        name = fields.get("Package")
        if name and (name not in out or _version_key(fields["Version"]) > _version_key(out[name]["Version"])):
            out[name] = fields
    return out


def _version_key(version: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", version)]


def newest_kernel(index: dict[str, dict[str, str]], line: str) -> str:
    """The newest kernel version V of ``line`` (``7``, ``7.3``) with all three parts in the index."""
    found = []
    for name in index:
        m = re.fullmatch(r"linux-binary-((\d+\.\d+)\.\d+\+[\w.]+-amd64)", name)
        if m and (m.group(2) == line or m.group(2).split(".")[0] == line):
            if all(p.format(v=m.group(1)) in index for p in PARTS):
                found.append(m.group(1))
    if not found:
        raise FetchError(f"no amd64 kernel of line {line} with {', '.join(p.format(v='V') for p in PARTS)}")
    return max(found, key=_version_key)


def unpack(debs: list[Path], version: str, workdir: Path) -> None:
    """Unpack the packages and move their kernel and modules to /usr/lib/modules/VERSION, then depmod."""
    root = workdir / "root"
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    modules = next((p for p in (root / "usr/lib/modules" / version, root / "lib/modules" / version) if p.is_dir()),
                   None)
    if modules is None:
        raise FetchError(f"the packages of {version} hold no lib/modules/{version}")
    if not (modules / "vmlinuz").is_file():  # linux-binary puts it there; older layouts in /boot
        if not (vmlinuz := root / "boot" / f"vmlinuz-{version}").is_file():
            raise FetchError(f"the packages of {version} hold no vmlinuz (lib/modules/{version} or /boot)")
        shutil.copy2(vmlinuz, modules / "vmlinuz")
    dest = MODULES / version
    staging = MODULES / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(modules, staging, symlinks=True)
    staging.rename(dest)  # all or nothing: a half-copied tree never looks like a kernel
    subprocess.run(["depmod", version], check=True)


def fetch(suite: str, line: str, mirror: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="tierd-kernel.") as tmp:
        workdir = Path(tmp)
        release = verified_release(mirror, suite, workdir)
        index_name = "main/binary-amd64/Packages.xz"
        index_xz = checked(download(f"{mirror}/dists/{suite}/{index_name}"), *sha256_of(release, index_name),
                           index_name)
        index = stanzas(lzma.decompress(index_xz).decode())
        version = newest_kernel(index, line)
        if (MODULES / version / "vmlinuz").is_file():
            print(f"fetch_kernel: {version} already in {MODULES / version}")
            return MODULES / version / "vmlinuz"
        debs = []
        for part in PARTS:
            fields = index[part.format(v=version)]
            url = f"{mirror}/{fields['Filename']}"
            print(f"fetch_kernel: {url} ({int(fields['Size']) >> 20} MiB)", flush=True)
            data = checked(download(url), fields["SHA256"], int(fields["Size"]), url)
            debs.append(workdir / Path(fields["Filename"]).name)
            debs[-1].write_bytes(data)
        unpack(debs, version, workdir)
    print(f"fetch_kernel: {version} ready: {MODULES / version / 'vmlinuz'}")
    return MODULES / version / "vmlinuz"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="trixie-backports", help="Debian suite [default: trixie-backports]")
    p.add_argument("--line", default="7", help="kernel line, e.g. 7 or 7.3 [default: 7, the newest 7.x]")
    p.add_argument("--mirror", help="Debian archive URI [default: this machine's apt source, else deb.debian.org]")
    args = p.parse_args(argv)
    if not re.fullmatch(r"\d+(\.\d+)?", args.line):
        p.error(f"--line {args.line!r}: want a major or major.minor version, e.g. 7 or 7.3")
    try:
        fetch(args.suite, args.line, args.mirror or apt_mirror())
    except (FetchError, subprocess.CalledProcessError, PermissionError) as e:
        print(f"fetch_kernel: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
