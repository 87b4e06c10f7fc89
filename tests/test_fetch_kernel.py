"""tools/guest/fetch_kernel.py: choosing a kernel from a suite's signed index, without the network."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.tool_module import load_tool


def _tool() -> ModuleType:
    return load_tool("guest/fetch_kernel.py", "fetch_kernel_tool")


def _stanza(name: str, version: str = "7.3.4-1~bpo13+1") -> str:
    return (f"Package: {name}\nVersion: {version}\nFilename: pool/main/l/linux/{name}.deb\nSize: 10\n"
            f"SHA256: {'0' * 64}\n")


def test_the_newest_kernel_of_the_line_with_all_three_parts() -> None:
    t = _tool()
    names = [f"{part}-{v}" for v in ("7.2.12+deb13-amd64", "7.3.4+deb13-amd64", "7.10.1+deb13-amd64")
             for part in ("linux-binary", "linux-modules", "linux-base")]
    names.remove("linux-base-7.10.1+deb13-amd64")  # incomplete: not a candidate
    names += ["linux-binary-7.3.9+deb13-cloud-amd64", "linux-binary-8.0.1+deb13-amd64"]  # other flavour, line
    index = t.stanzas("\n".join(_stanza(n) for n in names))
    assert t.newest_kernel(index, "7") == "7.3.4+deb13-amd64"  # 7.3 > 7.2 numerically; 7.10 lacks its base
    assert t.newest_kernel(index, "7.2") == "7.2.12+deb13-amd64"
    with pytest.raises(t.FetchError, match="no amd64 kernel of line 6"):
        t.newest_kernel(index, "6")


def test_a_repeated_package_keeps_its_newest_version() -> None:
    t = _tool()
    text = "\n".join([_stanza("linux-base-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
                      _stanza("linux-base-7.3.4+deb13-amd64", "7.3.4-1~bpo13+10")])
    assert t.stanzas(text)["linux-base-7.3.4+deb13-amd64"]["Version"] == "7.3.4-1~bpo13+10"


def test_every_download_is_checked_against_the_signed_index() -> None:
    t = _tool()
    data = b"kernel"
    digest = hashlib.sha256(data).hexdigest()
    release = (f"MD5Sum:\n {'f' * 32} 6 main/binary-amd64/Packages.xz\n"
               f"SHA256:\n {digest} 6 main/binary-amd64/Packages.xz\n")
    assert t.sha256_of(release, "main/binary-amd64/Packages.xz") == (digest, 6)
    assert t.checked(data, digest, 6, "x") == data
    with pytest.raises(t.FetchError, match="x: size or SHA256 differs"):
        t.checked(b"kernex", digest, 6, "x")
    with pytest.raises(t.FetchError, match="no SHA256 for main/binary-i386"):
        t.sha256_of(release, "main/binary-i386/Packages.xz")


def _deb(tmp: Path, files: dict[str, str]) -> Path:
    root = tmp / "pkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text("Package: linux-binary-test\nVersion: 1\nArchitecture: amd64\n"
                                         "Maintainer: t <t@t>\nDescription: t\n")
    subprocess.run(["dpkg-deb", "-b", "-Zgzip", str(root), str(tmp / "t.deb")], check=True, capture_output=True)
    return tmp / "t.deb"


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_unpack_puts_the_kernel_beside_its_modules_all_or_nothing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    t = _tool()
    v = "9.9.9+test-amd64"
    monkeypatch.setattr(t, "MODULES", tmp_path / "modules")
    (tmp_path / "modules").mkdir()
    run = subprocess.run
    depmod: list[list[str]] = []
    monkeypatch.setattr(t.subprocess, "run", lambda argv, **kw: depmod.append(argv) if argv[0] == "depmod"
                        else run(argv, **kw))
    broken = _deb(tmp_path / "a", {f"usr/lib/modules/{v}/modules.order": ""})  # no vmlinuz anywhere
    with pytest.raises(t.FetchError, match="no vmlinuz"):
        t.unpack([broken], v, tmp_path / "a")
    assert list((tmp_path / "modules").iterdir()) == [] and depmod == []
    good = _deb(tmp_path / "b", {f"usr/lib/modules/{v}/vmlinuz": "kernel", f"usr/lib/modules/{v}/modules.order": ""})
    t.unpack([good], v, tmp_path / "b")
    assert (tmp_path / "modules" / v / "vmlinuz").read_text() == "kernel"
    assert [p.name for p in (tmp_path / "modules").iterdir()] == [v] and depmod == [["depmod", v]]
