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
# TLS, mutual TLS and a principals file.
TLS = yaml.safe_load((CHART / "ci" / "tls-values.yaml").read_text())
KUBE_VERSIONS = ["1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0"]
# Custom resources have no schema among Kubernetes' own.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}


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


@pytest.mark.parametrize("values", [None, ALL_ON, TLS], ids=["defaults", "all-on", "tls"])
def test_lint_finds_no_errors(values):
    """helm lint (strict) reports no errors for the defaults, for every option on, and for
    TLS with mutual TLS and a principals file."""
    result = helm.lint(str(CHART), values, strict=True)
    assert result["errors"] == [], result
    errors = [m for m in result["messages"] if m["severity"] >= 3]
    assert errors == [], errors


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", [None, ALL_ON, TLS], ids=["defaults", "all-on", "tls"])
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
    """The all-on values add the ServiceMonitor, the PrometheusRule, the NetworkPolicy with
    their peers, and the Grafana dashboard's ConfigMap in Grafana's namespace."""
    docs = manifests(ALL_ON)
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (dashboard,) = of_kind(docs, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (rule,) = of_kind(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
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
    """ServiceMonitor, PrometheusRule, NetworkPolicy and the dashboard ConfigMap are opt-in; no
    OTEL_* variable is set by default."""
    docs = manifests()
    assert not of_kind(docs, "ServiceMonitor")
    assert not of_kind(docs, "PrometheusRule")
    assert not of_kind(docs, "NetworkPolicy")
    assert not of_kind(docs, "ConfigMap")
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
    """Each TICKD_* variable tickd reads is set by the chart, on one store or the other, or
    with TLS and a principals file (but the hidden test-only ones)."""
    names = {e["name"] for e in statefulset()["spec"]["template"]["spec"]["containers"][0]["env"]}
    names |= {e["name"] for e in statefulset(TLS)["spec"]["template"]["spec"]["containers"][0]["env"]}
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


TLS_ON_POSTGRESQL = {**TLS, **REPLICATED}


def pod_of(docs):
    """The pod spec of the StatefulSet or the Deployment."""
    (workload,) = of_kind(docs, "StatefulSet") + of_kind(docs, "Deployment")
    return workload["spec"]["template"]["spec"]


@pytest.mark.parametrize("values", [TLS, TLS_ON_POSTGRESQL], ids=["embedded", "postgresql"])
def test_tls_and_auth_files_are_mounted_where_tickd_reads_them(values):
    """Each file named by TICKD_TLS_CERT, TICKD_TLS_KEY, TICKD_TLS_CLIENT_CA and TICKD_AUTH_FILE
    lies in a read-only mount of the right Secret, which projects that key; no mount uses
    subPath (a subPath file is never updated, so a renewed certificate would not arrive)."""
    pod = pod_of(manifests(values))
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    wanted = {
        "TICKD_TLS_CERT": ("tickd-tls", "tls.crt"),
        "TICKD_TLS_KEY": ("tickd-tls", "tls.key"),
        "TICKD_TLS_CLIENT_CA": ("tickd-tls", "ca.crt"),
        "TICKD_AUTH_FILE": ("tickd-auth", "auth.yaml"),
    }
    for name, (secret, key) in wanted.items():
        directory, file = env[name].rsplit("/", 1)
        mount = mounts[directory]
        assert mount["readOnly"] is True
        volume = volumes[mount["name"]]["secret"]
        assert volume["secretName"] == secret, name
        assert {"key": key, "path": file} in volume["items"], name
        assert volume["defaultMode"] == 0o440
    assert not [m for m in container["volumeMounts"] if "subPath" in m or "subPathExpr" in m]
    # Data stays on the claim of the embedded store; PostgreSQL replicas have none.
    assert ("/var/lib/tickd" in mounts) == ("database" not in values)


def test_without_tls_or_auth_no_secret_is_mounted():
    """The defaults set no TLS, auth or health variable and mount nothing but the data volume."""
    pod = statefulset()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    names = {e["name"] for e in container["env"]}
    for name in ("TICKD_TLS_CERT", "TICKD_TLS_KEY", "TICKD_TLS_CLIENT_CA", "TICKD_AUTH_FILE", "TICKD_HEALTH_LISTEN"):
        assert name not in names
    assert "volumes" not in pod
    assert [m["name"] for m in container["volumeMounts"]] == ["data"]


def probe_ports(container):
    return {container[p]["grpc"]["port"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}


@pytest.mark.parametrize("values", [TLS, TLS_ON_POSTGRESQL], ids=["embedded", "postgresql"])
def test_probes_use_the_plaintext_health_port_with_tls(values):
    """A kubelet gRPC probe cannot speak TLS: with TLS the probes call the health port, which
    tickd listens on (TICKD_HEALTH_LISTEN), with the same service names; the port is neither in
    the Services nor opened by the NetworkPolicy."""
    docs = manifests(values)
    (container,) = pod_of(docs)["containers"]
    health = 8081
    assert probe_ports(container) == {health}
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    assert "service" not in container["readinessProbe"]["grpc"]
    assert "service" not in container["startupProbe"]["grpc"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TICKD_HEALTH_LISTEN"] == f"0.0.0.0:{health}"
    assert {"name": "health", "containerPort": health, "protocol": "TCP"} in container["ports"]
    for service in of_kind(docs, "Service"):
        assert health not in {p["port"] for p in service["spec"]["ports"]}
        assert "health" not in {p["targetPort"] for p in service["spec"]["ports"]}
    for policy in of_kind(docs, "NetworkPolicy"):
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        assert opened == {"grpc", "metrics"}


@pytest.mark.parametrize("values", [None, {"auth": {"existingSecret": "tickd-auth"}}], ids=["defaults", "auth-only"])
def test_probes_use_the_grpc_port_without_tls(values):
    """Without TLS the probes call the gRPC port (health needs no token, so an auth file
    changes nothing), and there is no health listener."""
    (container,) = statefulset(values)["spec"]["template"]["spec"]["containers"]
    assert probe_ports(container) == {config_defaults()["grpc_port"]}
    assert "health" not in {p["name"] for p in container["ports"]}
    assert "TICKD_HEALTH_LISTEN" not in {e["name"] for e in container["env"]}


def test_grpc_service_port_is_marked_as_tls_with_tls_on():
    """With TLS the Services mark the gRPC port https (a mesh must not read it as cleartext
    h2c); without, kubernetes.io/h2c."""
    for values, protocol in ((None, "kubernetes.io/h2c"), (TLS, "https")):
        for service in of_kind(manifests(values), "Service"):
            (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
            assert grpc["appProtocol"] == protocol


def helm_test_pod(values):
    (pod,) = of_kind(manifests(values), "Pod")
    return pod["spec"]


def flags(args):
    """grpc-health-probe arguments as a dict: -name=value, or -name: True."""
    return dict(a.split("=", 1) if "=" in a else (a, True) for a in args)


def test_helm_test_speaks_mutual_tls_to_the_grpc_port():
    """With TLS the helm test pod dials the Service's gRPC port over TLS, checks the certificate
    against the Service name with the CA of the TLS Secret (mounting only that key, never the
    server's private key), and presents its client certificate."""
    spec = helm_test_pod(TLS)
    (container,) = spec["containers"]
    args = flags(container["args"])
    assert args["-addr"] == "tickd:50051"
    assert args["-tls"] is True
    assert args["-tls-server-name"] == "tickd"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["secret"] for v in spec["volumes"]}
    files = {
        f"{mounts[name]}/{item['path']}": (volume["secretName"], item["key"])
        for name, volume in volumes.items()
        for item in volume["items"]
    }
    assert files[args["-tls-ca-cert"]] == ("tickd-tls", "ca.crt")
    assert files[args["-tls-client-cert"]] == ("tickd-test-client", "tls.crt")
    assert files[args["-tls-client-key"]] == ("tickd-test-client", "tls.key")
    assert ("tickd-tls", "tls.key") not in files.values()
    assert not [m for m in container["volumeMounts"] if "subPath" in m]
    # The 0440 files are readable through the pod's group.
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


def test_helm_test_ca_and_server_name_can_be_overridden():
    """tests.tls names another CA Secret and key and the name on the certificate; without
    mutual TLS no client certificate is sent."""
    values = {
        "tls": {"enabled": True, "secretName": "tickd-tls"},
        "tests": {"tls": {"caSecretName": "corp-ca", "caKey": "root.pem", "serverName": "tickd.example.com"}},
    }
    spec = helm_test_pod(values)
    args = flags(spec["containers"][0]["args"])
    assert args["-tls-server-name"] == "tickd.example.com"
    assert args["-tls-ca-cert"].endswith("/root.pem")
    (volume,) = spec["volumes"]
    assert volume["secret"]["secretName"] == "corp-ca"
    assert volume["secret"]["items"] == [{"key": "root.pem", "path": "root.pem"}]
    assert "-tls-client-cert" not in args and "-tls-client-key" not in args


def test_helm_test_is_plaintext_without_tls():
    """Without TLS the helm test passes no TLS flag and mounts nothing."""
    spec = helm_test_pod(None)
    assert not [a for a in spec["containers"][0]["args"] if a.startswith("-tls")]
    assert "volumes" not in spec and "volumeMounts" not in spec["containers"][0]


@pytest.mark.parametrize(
    "values",
    [
        {"tls": {"enabled": True}},
        {"tls": {"clientCA": {"secretName": "tickd-client-ca"}}},
        {"tls": {"enabled": "yes", "secretName": "tickd-tls"}},
        {"tls": {"enabled": True, "secretName": "tickd-tls", "clientCA": {"key": ""}}},
        {"auth": {"existingSecret": "tickd-auth", "key": ""}},
        {"health": {"port": 0}},
        {"tickd": {"reloadInterval": "often"}},
        {"tests": {"tls": {"caKey": ""}}},
    ],
    ids=[
        "tls-without-secret",
        "mtls-without-tls",
        "tls-not-boolean",
        "empty-client-ca-key",
        "empty-auth-key",
        "health-port",
        "reload-interval",
        "empty-test-ca-key",
    ],
)
def test_schema_refuses_incomplete_tls_and_auth(values):
    """TLS without its Secret, mutual TLS without TLS, and empty keys are refused before
    anything renders."""
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError):
            chart.render(values, name="tickd", namespace="scheduling")


def test_tls_without_a_secret_names_the_missing_value():
    """The refusal of tls.enabled without tls.secretName points at tls.secretName."""
    with pytest.raises(helm.HelmError) as err:
        render({"tls": {"enabled": True}})
    assert "/tls/secretName" in str(err.value)


def test_mutual_tls_needs_a_client_certificate_for_helm_test():
    """With mutual TLS the helm test cannot connect without a client certificate: rendering
    fails and says which value to set; with tests off it renders."""
    mtls = {"tls": {"enabled": True, "secretName": "tickd-tls", "clientCA": {"secretName": "tickd-tls"}}}
    with pytest.raises(helm.HelmError) as err:
        render(mtls)
    assert "tests.tls.clientCertSecretName" in str(err.value)
    assert not of_kind(manifests({**mtls, "tests": {"enabled": False}}), "Pod")


def test_health_port_must_be_a_port_of_its_own():
    """A health port equal to the gRPC or metrics port refuses to render, saying why."""
    for port in (50051, 9464):
        with pytest.raises(helm.HelmError) as err:
            render({**TLS, "health": {"port": port}})
        assert "health.port" in str(err.value)


def test_notes_show_a_tls_call():
    """With TLS, NOTES.txt's grpcurl calls verify the certificate and present a client one."""
    notes = render(TLS)["tickd/templates/NOTES.txt"]
    assert "-plaintext" not in notes
    assert (
        "grpcurl -cacert ca.crt -servername tickd -cert client.crt -key client.key "
        "localhost:50051 grpc.health.v1.Health/Check"
    ) in notes
