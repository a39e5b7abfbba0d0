"""The Kubernetes manifests: rendered with kustomize, validated against the
Kubernetes schemas offline, and the properties that matter asserted on the
rendered objects (no cluster can run here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nbdluks.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    if not shutil.which("kubectl"):
        pytest.fail("kubectl is needed to render deploy/k8s (kubectl kustomize)")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "k8s")],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return {d["kind"]: d for d in docs}


def test_every_object_validates_against_the_schemas(objects: dict[str, dict[str, Any]]
                                                     ) -> None:
    import kubernetes_validate

    assert set(objects) == {"Namespace", "Deployment", "Service", "NetworkPolicy"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, "1.30", strict=True)


def pod(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return objects["Deployment"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_security_context(objects: dict[str, dict[str, Any]]) -> None:
    spec = pod(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10809  # the image's user
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert objects["Namespace"]["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "restricted"


def test_secrets_are_files_and_the_command_line_is_valid(
        objects: dict[str, dict[str, Any]]) -> None:
    spec = pod(objects)
    (c,) = spec["containers"]
    assert not any("secretKeyRef" in str(e) for e in c.get("env", []))
    assert "envFrom" not in c
    args = build_parser().parse_args(c["args"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    assert args.passphrase_file == mounts["passphrase"] + "/passphrase"
    assert secrets["passphrase"]["secretName"] == "nbdluks-passphrase"
    assert all(s["defaultMode"] == 0o440 for s in secrets.values())  # group: fsGroup
    assert spec["securityContext"]["fsGroup"] == 10809
    assert args.tls == "require" and args.tls_verify_peer
    assert args.tls_certificates == mounts["tls"]
    assert all(h.startswith(("nbds://", "nbd://")) for h in [*args.header, args.payload])
    assert f"tls-certificates={mounts['header-client']}" in args.header[0]


def test_probes_and_resources_match_the_server(objects: dict[str, dict[str, Any]]) -> None:
    (c,) = pod(objects)["containers"]
    args = build_parser().parse_args(c["args"])
    port = int(args.metrics.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"nbd": int(args.port), "metrics": port}
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Mi") and int(limit[:-2]) >= args.max_memory + 256
    assert objects["Deployment"]["spec"]["replicas"] == 1  # one writer
    assert objects["Deployment"]["spec"]["strategy"]["type"] == "Recreate"


def test_network_policy_lets_in_clients_only(objects: dict[str, dict[str, Any]]) -> None:
    np = objects["NetworkPolicy"]["spec"]
    assert set(np["policyTypes"]) == {"Ingress", "Egress"}
    nbd_rule = next(r for r in np["ingress"] if r["ports"][0]["port"] == 10809)
    assert nbd_rule["from"] == [{"podSelector": {"matchLabels": {"nbdluks.io/client": "true"}}}]
    assert np["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nbdluks"}


def test_many_volumes_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/k8s-many: the exports from a ConfigMap whose file the server
    accepts, their passphrases from one Secret, every mount backed."""
    import os

    import kubernetes_validate

    from nbdluks.cli.arguments import explicit_options, serve_parser
    from nbdluks.cli.config import load

    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "k8s-many")],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    objs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    for obj in objs.values():
        kubernetes_validate.validate(obj, "1.30", strict=True)
    spec = objs["Deployment"]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    args = build_parser().parse_args(c["args"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts) == set(volumes) == {"config", "passphrases", "tls", "header-client"}
    assert volumes["config"]["configMap"]["name"] == objs["ConfigMap"]["metadata"]["name"]
    assert args.config == mounts["config"] + "/exports.toml"
    text = objs["ConfigMap"]["data"]["exports.toml"]
    path = ROOT / "build" / "k8s-many-exports.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    # the pod's directories, not this machine's
    isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: str(p).startswith("/etc/nbdluks/")
                        or isdir(p))
    cfg = load(str(path), serve_parser(), explicit_options(c["args"]))
    assert [e.name for e in cfg.exports] == ["db", "vm7"]
    for e in cfg.exports:
        assert e.keys.passphrase_file == f"{mounts['passphrases']}/{e.name}"


def test_example_configuration_is_valid() -> None:
    from nbdluks.cli.arguments import explicit_options, serve_parser
    from nbdluks.cli.config import load

    cfg = load(str(ROOT / "deploy" / "exports.example.toml"), serve_parser(),
               explicit_options(["serve"]))
    assert [e.name for e in cfg.exports] == ["db", "vm7", "scratch", "archive", "iso"]
    assert cfg.server.metrics == "127.0.0.1:9101"
    rotate = cfg.exports[3].rotate
    assert rotate is not None and rotate.hotzone_size == 4 << 20 and rotate.rate == 32 << 20
