"""The Helm chart: every template rendered with a few value sets and asserted on, renders
that must fail with their reason, lint, the values schema, and every manifest validated
against Kubernetes' own schemas."""

import json

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from routemesh.services.drift_detector.service import GROUP, SUBJECTS_GROUP
from routemesh.services.runtime.service import discover_services

from .chart import (
    ALL_ON,
    CHART,
    MINIMAL,
    container,
    env,
    find,
    manifests,
    merged,
    render,
)

KUBERNETES = "1.33.0"
# Custom resources (Prometheus Operator, KEDA): no schema in kubernetes-validate.
CUSTOM = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication",
          "HTTPRoute"}
ROOT = CHART.parents[1]


@pytest.mark.parametrize("values", [MINIMAL, ALL_ON], ids=["minimal", "all-on"])
def test_lint_is_clean_and_every_manifest_validates_strictly(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    kinds = set()
    for doc in manifests(base=values):
        kinds.add(doc["kind"])
        if doc["kind"] in CUSTOM:
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert "Secret" not in kinds


def test_the_all_on_render_has_every_kind():
    kinds = {d["kind"] for d in manifests(base=ALL_ON)}
    assert kinds == {"ConfigMap", "Deployment", "StatefulSet", "Service", "ServiceAccount",
                     "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Job",
                     "Pod", "ServiceMonitor", "PrometheusRule", "ScaledObject",
                     "TriggerAuthentication", "Ingress", "HTTPRoute", "PersistentVolumeClaim"}


def test_workloads_run_each_service_hardened_with_probes():
    docs = manifests()
    gateway = find(docs, "Deployment", "rm-routemesh-gateway")
    assert container(gateway)["args"] == ["gateway"]
    assert container(gateway)["readinessProbe"]["httpGet"] == {"path": "/readyz",
                                                               "port": "metrics"}
    assert container(gateway)["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container(gateway)["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    pod = gateway["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["initContainers"][0]["command"][:3] == ["routemesh", "bank", "build"]
    assert "replicas" not in gateway["spec"], "the HPA owns the gateway's replica count"
    for name in ("audit-writer", "drift-detector", "scorer", "replay-worker"):
        workload = find(docs, "StatefulSet", f"rm-routemesh-{name}")
        assert workload["spec"]["replicas"] == 1
        assert container(workload)["args"] == [name]
        claim = workload["spec"]["volumeClaimTemplates"][0]
        assert claim["metadata"]["name"] == "data"
        assert {"name": "data", "mountPath": "/var/lib/routemesh"} in container(
            workload)["volumeMounts"]


def test_secrets_are_referenced_never_given():
    docs = manifests(base=ALL_ON)
    gateway = find(docs, "StatefulSet", "rm-routemesh-gateway")
    variables = env(gateway)
    assert variables["ROUTEMESH_UPSTREAM_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "openai", "key": "api-key"}
    assert variables["ROUTEMESH_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kafka-routemesh", "key": "password"}
    assert variables["CODE_MODEL_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "code-model"
    assert variables["ROUTEMESH_QDRANT_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "qdrant"
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth-keys"]["secret"]["secretName"] == "routemesh-inbound-keys"
    for doc in docs:
        for container_ in doc.get("spec", {}).get("template", {}).get("spec", {}).get(
                "containers", []):
            for variable in container_.get("env", []):
                if any(word in variable["name"] for word in ("KEY", "PASSWORD", "TOKEN")) \
                        and not variable["name"].endswith(("_FILE", "KEYFILE")):
                    assert "valueFrom" in variable, variable


@pytest.mark.parametrize("bad", [
    {"upstream": {"apiKey": "sk-live-123"}},
    {"kafka": {"sasl": {"password": "hunter2"}}},
    {"auth": {"keys": ["my-key"]}},
])
def test_the_schema_has_no_place_for_a_secret_value(bad):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError,
                                                         match="additional properties"):
        chart.validate_schema(merged(MINIMAL, bad))


def test_the_schema_refuses_a_misspelt_key_and_a_wrong_type():
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match="'bootstrapServer' not allowed"):
            chart.validate_schema(merged(MINIMAL, {"kafka": {"bootstrapServer": "k:9092"}}))
        with pytest.raises(helm.HelmValuesError, match=r"replicas.*want integer"):
            chart.validate_schema(merged(MINIMAL, {"services": {"gateway": {"replicas": "2"}}}))
        chart.validate_schema(MINIMAL)


def test_a_config_change_rolls_the_pods():
    def checksum(values):
        docs = manifests(values)
        workload = find(docs, "StatefulSet", "rm-routemesh-scorer")
        return workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    config = {"routeConfig": {"files": {"routes.yaml": ALL_ON["routeConfig"]["files"][
        "routes.yaml"]}}}
    edited = {"routeConfig": {"files": {"routes.yaml": ALL_ON["routeConfig"]["files"][
        "routes.yaml"].replace("0.6", "0.65")}}}
    assert checksum(config) == checksum(config)
    assert checksum(config) != checksum(edited)
    assert checksum({"services": {"scorer": {"env": {"ROUTEMESH_SCORER_MIN_SAMPLES": "80"}}}}) \
        != checksum({})


def test_the_route_config_is_mounted_from_the_chart_or_an_existing_configmap():
    inline = manifests(base=ALL_ON)
    config = find(inline, "ConfigMap", "rm-routemesh-routes")
    assert "default_route: lite" in config["data"]["routes.yaml"]
    scorer = find(inline, "StatefulSet", "rm-routemesh-scorer")
    assert env(scorer)["ROUTEMESH_ROUTER_CONFIG"]["value"] == "/etc/routemesh-config/routes.yaml"
    existing = manifests({"routeConfig": {"existingConfigMap": "my-routes"}})
    scorer = find(existing, "StatefulSet", "rm-routemesh-scorer")
    volumes = {v["name"]: v for v in scorer["spec"]["template"]["spec"]["volumes"]}
    assert volumes["route-config"]["configMap"]["name"] == "my-routes"
    assert not [d for d in existing if d["kind"] == "ConfigMap"]


@pytest.mark.parametrize(("values", "message"), [
    ({"services": {"audit-writer": {"replicas": 2}}},
     "services.audit-writer runs more than one replica, and its replicas share their data "
     "(the writers keep one audit trail in one directory"),
    ({"services": {"replay-worker": {"keda": {"enabled": True}}}},
     "services.replay-worker runs more than one replica"),
    ({"services": {"drift-detector": {"replicas": 3}}},
     "services.drift-detector runs more than one replica, which needs "
     "env.ROUTEMESH_DRIFT_STATE_STORE: changelog"),
    ({"services": {"gateway": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}},
     "services.gateway.autoscaling.minReplicas (5) is greater than maxReplicas (2)"),
    ({"kafka": {"bootstrapServers": ""}},
     "kafka.bootstrapServers is required: the brokers every service connects to"),
    ({"services": {"example": {"enabled": True, "replicas": 1, "consumerGroup": "g",
                               "topics": ["t"], "keda": {"enabled": True, "maxReplicas": 9}}}},
     "services.example.keda.maxReplicas (9) is more than kafka.partitions (6)"),
    ({"auth": {"existingSecret": ""}}, "auth.existingSecret is required when auth.enabled"),
    ({"image": {"tag": "sha256:" + "a" * 64}}, "at '/image/tag'"),
    ({"services": {"gateway": {"httpPort": 9100}}}, "at '/services/gateway/httpPort'"),
    ({"routeConfig": {"files": {"routes.yaml": "x", "lite/utterances.txt": "y"}}},
     "'lite/utterances.txt' does not match pattern"),
    ({"kafka": {"securityProtocol": "SASL_SSL"}},
     "kafka.securityProtocol SASL_SSL needs kafka.sasl.existingSecret"),
    ({"services": {"gateway": {"replicas": 5}}},
     "services.gateway.replicas (5) does nothing while autoscaling is on"),
    ({"fullnameOverride": "a-release-name-long-enough-to-break-statefulsets",
      "services": {"gateway": {"persistence": {"enabled": True}}}},
     "the StatefulSet name a-release-name-long-enough-to-brea"),
    ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs is required"),
    ({"services": {"scorer": {"replicas": 2}}},
     "services.scorer runs more than one replica, which needs "
     "env.ROUTEMESH_SCORER_STATE_STORE: changelog"),
])
def test_renders_that_must_fail_say_why(values, message):
    with pytest.raises((helm.HelmRenderError, helm.HelmValuesError)) as info:
        render(values)
    assert message in str(info.value)


def test_consumers_that_share_their_data_scale_on_one_shared_volume():
    shared = {"enabled": True, "shared": True, "size": "50Gi", "storageClass": "nfs"}
    docs = manifests({"services": {
        "audit-writer": {"replicas": 3, "persistence": shared},
        "replay-worker": {"replicas": 2,
                          "persistence": {"enabled": True, "shared": True,
                                          "existingClaim": "team-replays"}}}})
    writers = find(docs, "Deployment", "rm-routemesh-audit-writer")
    assert writers["spec"]["replicas"] == 3
    volumes = {v["name"]: v for v in writers["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == \
        "rm-routemesh-audit-writer-data"
    claim = find(docs, "PersistentVolumeClaim", "rm-routemesh-audit-writer-data")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not [d for d in docs if d["kind"] == "StatefulSet"
                and d["metadata"]["name"] == "rm-routemesh-audit-writer"]
    assert not [d for d in docs if d["kind"] == "Service"
                and d["metadata"]["name"] == "rm-routemesh-audit-writer-headless"]
    workers = find(docs, "Deployment", "rm-routemesh-replay-worker")
    volumes = {v["name"]: v for v in workers["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "team-replays"
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"
                and "replay" in d["metadata"]["name"]], "the user's claim is not made"
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs
            if d["kind"] == "PodDisruptionBudget"}
    for consumer in ("audit-writer", "drift-detector", "scorer", "replay-worker"):
        assert pdbs[f"rm-routemesh-{consumer}"]["maxUnavailable"] == 1


@pytest.mark.parametrize(("name", "variable"), [
    ("scorer", "ROUTEMESH_SCORER_STATE_STORE"),
    ("drift-detector", "ROUTEMESH_DRIFT_STATE_STORE"),
])
def test_stateful_consumers_scale_with_their_state_on_a_changelog(name, variable):
    docs = manifests({"services": {name: {
        "replicas": 3, "env": {variable: "changelog"}, "persistence": {"enabled": False}}}})
    replicas = find(docs, "Deployment", f"rm-routemesh-{name}")
    assert replicas["spec"]["replicas"] == 3
    assert env(replicas)[variable]["value"] == "changelog"


def test_a_new_service_needs_only_a_values_block():
    docs = manifests(base=ALL_ON)
    workload = find(docs, "Deployment", "rm-routemesh-example-consumer")
    assert container(workload)["args"] == ["example-consumer"]
    find(docs, "Service", "rm-routemesh-example-consumer")
    scaled = find(docs, "ScaledObject", "rm-routemesh-example-consumer")
    assert scaled["spec"]["maxReplicaCount"] == 6
    assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == \
        "routemesh-example-consumer"
    assert scaled["spec"]["triggers"][0]["metadata"]["topic"] == "routemesh.route.decisions.v1"


def test_autoscaling_pdb_and_network_policy():
    docs = manifests(base=ALL_ON)
    hpa = find(docs, "HorizontalPodAutoscaler", "rm-routemesh-gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    pdb = find(docs, "PodDisruptionBudget", "rm-routemesh-gateway")["spec"]
    assert (pdb["maxUnavailable"], "minAvailable" in pdb) == (1, False)
    gateway = find(docs, "NetworkPolicy", "rm-routemesh-gateway")
    ports = [rule["ports"][0]["port"] for rule in gateway["spec"]["ingress"]]
    assert ports == [9100, 8080]
    scorer = find(docs, "NetworkPolicy", "rm-routemesh-scorer")
    assert [rule["ports"][0]["port"] for rule in scorer["spec"]["ingress"]] == [9100]
    egress_ports = {p["port"] for rule in scorer["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 9093, 6333, 443, 4318}


def test_monitoring_objects_come_from_the_deploy_files():
    docs = manifests(base=ALL_ON)
    rule = find(docs, "PrometheusRule", "rm-routemesh")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
    dashboard = find(docs, "ConfigMap", "rm-routemesh-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["routemesh.json"]) == json.loads(
        (ROOT / "deploy/grafana/routemesh.json").read_text())
    monitor = find(docs, "ServiceMonitor", "rm-routemesh")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_topics_job_is_a_hook_and_helm_test_calls_the_gateway():
    docs = manifests()
    job = find(docs, "Job", "rm-routemesh-topics")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["command"][:3] == ["routemesh", "topics", "create"]
    test = find(docs, "Pod", "rm-routemesh-test")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = test["spec"]["containers"][0]["command"][2]
    assert "/v1/models" in script
    assert "/readyz" in script


def test_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject


def test_every_hook_refers_only_to_what_exists_before_it_runs():
    """A pre-install hook runs before the release's ordinary objects exist: the topics
    Job mounting the chart's routes ConfigMap (or running as the chart's ServiceAccount)
    waited for an object that was never coming, and the first install hung."""
    docs = manifests(base=ALL_ON)
    created = {(d["kind"], d["metadata"]["name"]) for d in docs
               if "helm.sh/hook" not in d["metadata"].get("annotations", {})}
    job = find(docs, "Job", "rm-routemesh-topics")
    spec = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not [v for v in volumes.values() if "configMap" in v]
    refs = {("Secret", v["secret"]["secretName"]) for v in volumes.values() if "secret" in v}
    refs |= {("Secret", e["valueFrom"]["secretKeyRef"]["name"]) for e in container(job)["env"]
             if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    refs.add(("ServiceAccount", spec["serviceAccountName"]))
    assert not refs & created, "the hook refers to objects the release makes after it"
    assert refs == {("Secret", "kafka-ca"), ("Secret", "kafka-routemesh"),
                    ("ServiceAccount", "routemesh-topics")}
    assert "ROUTEMESH_ROUTER_CONFIG" not in env(job)
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"][0]["key"] == "dedicated"


def test_the_test_pod_can_pull_schedule_and_pass_the_network_policies():
    docs = manifests(base=ALL_ON)
    test = find(docs, "Pod", "rm-routemesh-test")["spec"]
    assert [s["name"] for s in test["imagePullSecrets"]] == ["umbrella-registry", "registry"]
    assert test["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert test["tolerations"][0]["value"] == "mesh"
    peer = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "routemesh",
                                            "app.kubernetes.io/instance": "rm",
                                            "app.kubernetes.io/component": "test"}}}
    gateway = find(docs, "NetworkPolicy", "rm-routemesh-gateway")
    assert all(peer in rule["from"] for rule in gateway["spec"]["ingress"])


def test_keda_reads_the_lag_through_the_services_kafka_secrets():
    docs = manifests(base=ALL_ON)
    scaled = find(docs, "ScaledObject", "rm-routemesh-example-consumer")
    trigger = scaled["spec"]["triggers"][0]
    assert (trigger["metadata"]["sasl"], trigger["metadata"]["tls"]) == ("scram_sha512", "enable")
    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("kafka-routemesh", "username"),
                    "password": ("kafka-routemesh", "password"),
                    "ca": ("kafka-ca", "ca.crt"), "cert": ("kafka-ca", "tls.crt"),
                    "key": ("kafka-ca", "tls.key")}
    plain = manifests({"services": {"example": {"enabled": True, "replicas": 1,
                                                "consumerGroup": "g", "topics": ["t"],
                                                "keda": {"enabled": True, "minReplicas": 1,
                                                         "maxReplicas": 2,
                                                         "lagThreshold": 10}}}})
    assert not [d for d in plain if d["kind"] == "TriggerAuthentication"]


def test_what_users_of_other_charts_expect_renders():
    docs = manifests(base=ALL_ON)
    gateway = find(docs, "StatefulSet", "rm-routemesh-gateway")
    pod = gateway["spec"]["template"]
    assert container(gateway)["image"] == ("registry.example.com/routemesh/routemesh@sha256:"
                                           + "0123456789abcdef" * 4)
    assert pod["metadata"]["annotations"]["team"] == "platform"
    assert pod["metadata"]["labels"]["cost-center"] == "llm"
    variables = env(gateway)
    assert variables["OTEL_RESOURCE_ATTRIBUTES"]["value"] == "deployment.environment=prod"
    assert variables["HTTPS_PROXY"]["valueFrom"]["configMapKeyRef"]["name"] == "proxy"
    assert container(gateway)["envFrom"] == [{"configMapRef": {"name": "routemesh-extra"}}]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["gateway", "log-shipper"]
    assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in \
        container(gateway)["volumeMounts"]
    assert pod["spec"]["priorityClassName"] == "routemesh-high"
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert container(gateway)["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert variables["ROUTEMESH_SHUTDOWN_TIMEOUT_S"]["value"] == "50"
    assert gateway["spec"]["serviceName"] == "rm-routemesh-gateway-headless"
    headless = find(docs, "Service", "rm-routemesh-gateway-headless")
    assert headless["spec"]["clusterIP"] == "None"
    monitor = find(docs, "ServiceMonitor", "rm-routemesh")["spec"]
    assert {"key": "routemesh.io/headless", "operator": "DoesNotExist"} in \
        monitor["selector"]["matchExpressions"]
    assert {"targetLabel": "job", "replacement": "routemesh"} in \
        monitor["endpoints"][0]["relabelings"]
    service = find(docs, "Service", "rm-routemesh-gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    ingress = find(docs, "Ingress", "rm-routemesh-gateway")["spec"]
    assert ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == \
        "rm-routemesh-gateway"
    route = find(docs, "HTTPRoute", "rm-routemesh-gateway")["spec"]
    assert route["rules"][0]["backendRefs"][0]["port"] == 8080
    audit = find(docs, "Deployment", "rm-routemesh-audit-writer")
    assert "ROUTEMESH_ROUTER_CONFIG" not in env(audit), "it reads no route config"
    assert "ROUTEMESH_ROUTER_CONFIG" in env(find(docs, "StatefulSet", "rm-routemesh-scorer"))
    minimal = find(manifests(), "Deployment", "rm-routemesh-gateway")
    volumes = {v["name"]: v for v in minimal["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert container(minimal)["image"] == "ghcr.io/routemesh/routemesh:0.1.0"


def test_the_chart_and_dev_set_the_same_environment_to_scale_out():
    """What the chart requires of more than one replica and what `routemesh dev
    --replicas` sets come from one truth each; they must say the same."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["services"]
    specs = discover_services()
    assert set(specs) <= set(values)
    for name, spec in specs.items():
        assert values[name].get("scaleOutEnv", {}) == spec.scale_out_env, name


def test_keda_scales_a_drift_detector_on_the_lag_of_both_its_groups():
    docs = manifests({"services": {"drift-detector": {
        "env": {"ROUTEMESH_DRIFT_STATE_STORE": "changelog"},
        "keda": {"enabled": True}}}})
    scaled = find(docs, "ScaledObject", "rm-routemesh-drift-detector")
    lags = {(t["metadata"]["consumerGroup"], t["metadata"]["topic"])
            for t in scaled["spec"]["triggers"]}
    assert lags == {(GROUP, "routemesh.route.decisions.v1"),
                    (GROUP, "routemesh.llm.observations.v1"),
                    (SUBJECTS_GROUP, "routemesh.drift.inputs.v1")}, "the groups the code runs"
