"""The Helm chart and the Dockerfile, checked without a cluster.

The chart is rendered and linted by Helm v4's own engine (helm-python-sdk), and every rendered
manifest is validated against the Kubernetes schemas of 1.29 to 1.33 (kubernetes-validate).
The image and the chart are checked against the code: binary name, ports, settings, version.
"""

import re
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tickd"
ALL_ON = yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())
KUBE_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
# Custom resources have no schema among Kubernetes' own.
CUSTOM_KINDS = {"ServiceMonitor"}


def render(values=None):
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name="tickd", namespace="scheduling")


def manifests(values=None):
    docs = []
    for path, text in render(values).items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def statefulset(values=None):
    (sts,) = of_kind(manifests(values), "StatefulSet")
    return sts


def config_defaults():
    """Defaults and env variables as src/config.rs declares them."""
    source = (ROOT / "src" / "config.rs").read_text()
    return {
        "env": set(re.findall(r'env = "(TICKD_[A-Z0-9_]+)"', source)),
        "grpc_port": int(re.search(r'TICKD_LISTEN", default_value = "[^:]+:(\d+)"', source)[1]),
        "metrics_port": int(
            re.search(r'TICKD_METRICS_LISTEN", default_value = "[^:]+:(\d+)"', source)[1]
        ),
    }


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_lint_finds_no_errors(values):
    """helm lint (strict) reports no errors for the defaults and for every option on."""
    result = helm.lint(str(CHART), values, strict=True)
    assert result["errors"] == [], result
    errors = [m for m in result["messages"] if m["severity"] >= 3]
    assert errors == [], errors


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-on"])
def test_manifests_are_valid_kubernetes(values, kube):
    """Every rendered manifest is valid against the Kubernetes schema of each version."""
    docs = manifests(values)
    assert {"StatefulSet", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, kube, strict=True)


def test_all_on_renders_every_optional_part():
    """The all-on values add the ServiceMonitor and the NetworkPolicy with their peers."""
    docs = manifests(ALL_ON)
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (policy,) = of_kind(docs, "NetworkPolicy")
    peers = [rule["from"] for rule in policy["spec"]["ingress"]]
    assert peers[0][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "apps"
    }
    env = {e["name"]: e.get("value") for e in statefulset(ALL_ON)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_SERVICE_NAME"] == "tickd-prod"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert env["RUST_BACKTRACE"] == "1"


def test_optional_parts_are_off_by_default():
    """ServiceMonitor and NetworkPolicy are opt-in; no OTEL_* variable is set by default."""
    docs = manifests()
    assert not of_kind(docs, "ServiceMonitor")
    assert not of_kind(docs, "NetworkPolicy")
    env = statefulset()["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in env if e["name"].startswith("OTEL_")]


def test_more_than_one_replica_on_the_embedded_store_fails_with_the_reason():
    """replicaCount > 1 without a database refuses to render, and says what to do."""
    with pytest.raises(helm.HelmError) as err:
        render({"replicaCount": 2})
    assert "replicaCount must be 1" in str(err.value)
    assert "database.existingSecret" in str(err.value)


REPLICATED = {"replicaCount": 3, "database": {"existingSecret": "tickd-db"}}


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_replicas_on_postgresql_render_a_valid_deployment(kube):
    """With a database Secret, any number of replicas: a Deployment (no StatefulSet, no volume,
    no headless Service), the URL from the Secret, a PodDisruptionBudget keeping one pod, and
    replicas spread over nodes; every manifest valid, lint clean."""
    docs = manifests(REPLICATED)
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, kube, strict=True)
    assert not of_kind(docs, "StatefulSet")
    assert [s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"] == []
    (deployment,) = of_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "volumeMounts" not in container and "volumes" not in pod
    env = {e["name"]: e for e in container["env"]}
    assert env["TICKD_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "tickd-db",
        "key": "database-url",
    }
    assert "value" not in env["TICKD_DATABASE_URL"]
    assert "TICKD_DATA_DIR" not in env
    assert env["TICKD_DATABASE_NOTIFY"]["value"] == "true"
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "minAvailable": 1,
        "selector": deployment["spec"]["selector"],
    }
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # Readiness follows the database: the same probes as on the embedded store.
    assert "service" not in container["readinessProbe"]["grpc"]
    result = helm.lint(str(CHART), REPLICATED, strict=True)
    assert result["errors"] == [], result


def test_replica_spreading_can_be_required_or_left_to_affinity():
    """podAntiAffinity "hard" requires distinct nodes; an explicit affinity replaces it."""
    hard = {**REPLICATED, "podAntiAffinity": "hard"}
    (deployment,) = of_kind(manifests(hard), "Deployment")
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
        "kubernetes.io/hostname"
    )
    own = {**REPLICATED, "affinity": ALL_ON["affinity"]}
    (deployment,) = of_kind(manifests(own), "Deployment")
    assert deployment["spec"]["template"]["spec"]["affinity"] == ALL_ON["affinity"]


def test_a_database_url_is_never_a_plain_value():
    """The schema has no place for the URL itself: only the name of a Secret."""
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"database": {"url": "postgres://u:secret@db/tickd"}})


@pytest.mark.parametrize(
    "values",
    [
        {"service": {"grpcPort": "fifty"}},
        {"service": {"grpcPort": 70000}},
        {"tickd": {"logFormat": "xml"}},
        {"tickd": {"shutdownGrace": "soon"}},
        {"image": {"pullPolicy": "Sometimes"}},
        {"persistence": {"size": "lots"}},
        {"otel": {"endpoint": "collector:4317"}},
        {"unknownKey": True},
    ],
    ids=lambda v: next(iter(v)),
)
def test_schema_rejects_bad_values(values):
    """values.schema.json refuses bad values before anything renders."""
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError):
            chart.render(values, name="tickd", namespace="scheduling")


def test_every_setting_is_reachable_from_values():
    """Each TICKD_* variable tickd reads is set by the chart, on one store or the other (but
    the hidden test-only ones)."""
    names = {e["name"] for e in statefulset()["spec"]["template"]["spec"]["containers"][0]["env"]}
    (deployment,) = of_kind(manifests(REPLICATED), "Deployment")
    names |= {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    wanted = {v for v in config_defaults()["env"] if not v.startswith("TICKD_TEST_")}
    assert wanted <= names, wanted - names


def test_pod_is_locked_down_and_probed():
    """gRPC probes, a restrictive security context, a volume claim, and a grace period longer
    than tickd's own shutdown grace."""
    sts = statefulset()
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    grpc_port = config_defaults()["grpc_port"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    # Liveness asks only whether the core is alive (a full disk must not restart the pod);
    # readiness asks whether tickd can commit.
    server = (ROOT / "src/api/server.rs").read_text()
    (liveness,) = re.findall(r'LIVENESS_SERVICE_NAME: &str = "([^"]+)"', server)
    assert container["livenessProbe"]["grpc"]["service"] == liveness
    assert "service" not in container["readinessProbe"]["grpc"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["requests"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert container["volumeMounts"][0]["name"] == claim["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = env["TICKD_SHUTDOWN_GRACE"]
    assert grace.endswith("s")
    assert pod["terminationGracePeriodSeconds"] > int(grace[:-1])


def test_service_ports_match_the_code():
    """The Service exposes the ports tickd listens on by default, with appProtocol set."""
    defaults = config_defaults()
    (service,) = [s for s in of_kind(manifests(), "Service") if "clusterIP" not in s["spec"]]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == defaults["grpc_port"]
    assert ports["metrics"]["port"] == defaults["metrics_port"]
    assert all(p.get("appProtocol") for p in ports.values())


def test_app_version_is_the_crate_version():
    """Chart.yaml's appVersion is Cargo.toml's version."""
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == cargo["package"]["version"]


def test_cargo_run_starts_the_server():
    """The README's `cargo run --release` needs a default binary, now that there are two."""
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    assert cargo["package"]["default-run"] == cargo["package"]["name"] == "tickd"


def test_dockerfile_matches_the_code_and_chart():
    """The image runs the tickd binary as a non-root user and exposes the ports of the code
    and the chart."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    binary = cargo["package"]["name"]
    assert re.search(rf'ENTRYPOINT \["/usr/local/bin/{binary}"\]', dockerfile)
    assert f"cargo build --release --locked --bin {binary}" in dockerfile
    (exposed,) = re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)
    defaults = config_defaults()
    assert [int(p) for p in exposed.split()] == [defaults["grpc_port"], defaults["metrics_port"]]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["service"]["grpcPort"] == defaults["grpc_port"]
    assert values["service"]["metricsPort"] == defaults["metrics_port"]
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and not user[-1].startswith("0") and user[-1] != "root"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "target/" in dockerignore


def test_dockerfile_stubs_every_declared_bench():
    """The image's dependency stage builds with stub sources, and cargo refuses a manifest whose
    declared benches have no source: each [[bench]] of Cargo.toml needs its stub."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())
    (stubbed,) = re.findall(r"for bench in ([a-z_ ]+); do echo 'fn main\(\) \{\}' > benches/\$bench\.rs", dockerfile)
    assert sorted(stubbed.split()) == sorted(b["name"] for b in cargo.get("bench", []))


def test_notes_say_how_to_reach_tickd():
    """NOTES.txt explains the port-forward and a grpcurl call."""
    notes = render()["tickd/templates/NOTES.txt"]
    assert "port-forward svc/tickd 50051:50051" in notes
    assert "grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check" in notes


def test_numbers_render_as_plain_integers():
    """Large numbers from a values file reach tickd as integers it can parse, not 1.048576e+06."""
    env = {
        e["name"]: e.get("value")
        for e in statefulset(ALL_ON)["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TICKD_MAX_PAYLOAD_BYTES"] == "1048576"
    for name in ("TICKD_MAX_PAYLOAD_BYTES", "TICKD_MAX_CATCH_UP_FIRES", "TICKD_MAX_CONCURRENT_REQUESTS"):
        assert re.fullmatch(r"[0-9]+", env[name]), (name, env[name])


def test_long_names_stay_within_kubernetes_limits():
    """A 63-character fullnameOverride still gives valid Service and StatefulSet names."""
    docs = manifests({"fullnameOverride": "x" * 63})
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    (sts,) = of_kind(docs, "StatefulSet")
    assert len(sts["metadata"]["name"]) <= 52
    headless = [s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert sts["spec"]["serviceName"] == headless[0]["metadata"]["name"]


def test_test_pod_is_not_selected_as_a_tickd_pod():
    """The helm test pod is outside the selectors of the Services, the PDB and the
    NetworkPolicy, and the NetworkPolicy lets it reach gRPC."""
    docs = manifests(ALL_ON)
    (pod,) = of_kind(docs, "Pod")
    selector = statefulset(ALL_ON)["spec"]["selector"]["matchLabels"]
    labels = pod["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in selector.items())
    (policy,) = of_kind(docs, "NetworkPolicy")
    grpc_peers = policy["spec"]["ingress"][0]["from"]
    assert any(
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "test"
        for p in grpc_peers
    )
