"""The fleet files: the Kubernetes manifest validates against the Kubernetes schemas (kubernetes-validate), grants
the unit's capabilities and nothing more, runs commands tierd and tierctl accept, and carries a valid config; the
Containerfile installs what the README installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tierd.cli import tierctl_parser, tierd_parser
from tierd.config import parse_config
from tierd.kernel.privilege import NEEDED

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "etc/kubernetes/tierd.yaml"
CONTAINERFILE = REPO / "etc/container/Containerfile"
#: The oldest Kubernetes release still supported upstream when this was written, and the newest the schemas know.
K8S_VERSIONS = ("1.32.0", "1.37.0")


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        pytest.fail("kubernetes-validate is missing: python3 -m pip install -e '.[test]'")
    return subprocess.run([tool, "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=300)


def documents() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def container() -> dict[str, Any]:
    pod = documents()["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return dict(c)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    r = kubernetes_validate(MANIFEST, version)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == 4, r.stdout


def test_validation_rejects_a_broken_manifest(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("hostPID: true", "hostPID: true\n      hostPIDs: true"))
    r = kubernetes_validate(broken, K8S_VERSIONS[-1])
    assert r.returncode != 0 and "hostPIDs" in r.stdout + r.stderr


def test_capabilities_are_the_units_and_nothing_more() -> None:
    sc = container()["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {f"CAP_{c}" for c in sc["capabilities"]["add"]} == {name for name, _ in NEEDED.values()}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    pod = documents()["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # tierd never talks to the API server


def test_commands_are_ones_tierd_and_tierctl_accept() -> None:
    c = container()
    args = tierd_parser().parse_args(c["args"])
    assert args.command == "run" and args.sysfs_root == "/host/sys" and args.procfs_root == "/host/proc"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/host/sys", "/host/proc", "/run/tierd", "/etc/tierd"} <= mounts
    for probe in ("startupProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[0] == "/usr/local/bin/tierctl"
        assert tierctl_parser().parse_args(cmd[1:]).command == "health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/metrics"


def test_configmap_holds_a_valid_config_matching_the_pod() -> None:
    text = documents()["ConfigMap"]["data"]["tierd.toml"]
    cfg = parse_config(text, "ConfigMap tierd-config")
    port = container()["ports"][0]["containerPort"]
    assert cfg.daemon.metrics_address == f"0.0.0.0:{port}"  # hostNetwork: reachable by Prometheus
    assert cfg.daemon.state_dir == "/run/tierd"  # the hostPath that survives a pod restart


def test_containerfile_installs_what_the_readme_installs() -> None:
    text = CONTAINERFILE.read_text()
    assert "sh /src/tools/install.sh" in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{CONTAINERFILE.name}: COPY {src}: no such path"
    assert 'ENTRYPOINT ["/usr/local/bin/tierd"]' in text
