#!/usr/bin/env bash
# Chart checks: helm lint, schema validation of the rendered manifests with
# kubernetes-validate, least-privilege RBAC, and values.schema.json refusing bad values.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${GPUSCALE_KUBERNETES_VALIDATE:?run through scripts/test.sh (needs scripts/ensure-tools.sh)}"
CHART=charts/gpuscale
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
fail() { echo "chart check FAILED: $*" >&2; exit 1; }

: "${GPUSCALE_README_GENERATOR:?run through scripts/test.sh (needs scripts/ensure-tools.sh)}"
MONITORING=(--set monitoring.serviceMonitor.enabled=true --set monitoring.podMonitor.enabled=true
  --set monitoring.prometheusRule.enabled=true --set monitoring.dashboard.enabled=true)
helm lint --strict "$CHART"
helm lint --strict "$CHART" "${MONITORING[@]}"

# The README's parameter table is generated from values.yaml's @param comments (which
# the generator also checks cover every value).
cp "$CHART/README.md" "$out/README.md"
"$GPUSCALE_README_GENERATOR" --values "$CHART/values.yaml" --readme "$out/README.md" >/dev/null \
  || fail "values.yaml's @param comments do not match its values"
diff -u "$CHART/README.md" "$out/README.md" \
  || fail "charts/gpuscale/README.md is stale: run readme-generator --values values.yaml --readme README.md in the chart"

helm template gpuscale "$CHART" --namespace gpuscale >"$out/default.yaml"
helm template gpuscale "$CHART" --namespace gpuscale --set nodeAgent.enabled=false \
  --set serviceAccount.create=false --set serviceAccount.name=existing >"$out/minimal.yaml"
for f in "$out/default.yaml" "$out/minimal.yaml"; do
  "$GPUSCALE_KUBERNETES_VALIDATE" --strict --quiet "$f" || fail "$f does not validate"
done
# Least privilege: no wildcard verbs/resources/groups and no binding to cluster-admin.
# PyYAML comes with kubernetes-validate's venv.
"$(dirname "$GPUSCALE_KUBERNETES_VALIDATE")/python" - "$out/default.yaml" <<'PY' || fail "RBAC is not least-privilege"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
bad = []
for d in docs:
    if d["kind"] in ("ClusterRole", "Role"):
        for r in d.get("rules", []):
            for key in ("verbs", "resources", "apiGroups"):
                if "*" in r.get(key, []):
                    bad.append(f"{d['metadata']['name']}: wildcard in {key}")
            if "escalate" in r.get("verbs", []) or "bind" in r.get("verbs", []):
                bad.append(f"{d['metadata']['name']}: escalate/bind verb")
    if d["kind"] in ("ClusterRoleBinding", "RoleBinding") and d["roleRef"]["name"] in ("cluster-admin", "admin", "edit"):
        bad.append(f"{d['metadata']['name']}: binds {d['roleRef']['name']}")
    if d["kind"] in ("Deployment", "DaemonSet"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")):
                bad.append(f"{d['metadata']['name']}/{c['name']}: not non-root with a read-only root filesystem")
            if "resources" not in c or "requests" not in c["resources"]:
                bad.append(f"{d['metadata']['name']}/{c['name']}: no resource requests")
            if "livenessProbe" not in c:
                bad.append(f"{d['metadata']['name']}/{c['name']}: no liveness probe")
print("\n".join(bad) or "RBAC and pod security: ok")
sys.exit(1 if bad else 0)
PY

# Images: a mirror, a digest, pull secrets for the chart's pods and (through the
# operator) the workers; the node agent on any GPU node however it is labelled; HA.
helm template gpuscale "$CHART" --namespace gpuscale --set global.imageRegistry=mirror.local:5000 \
  --set operator.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef \
  --set 'global.imagePullSecrets={regcred}' >"$out/mirror.yaml"
"$GPUSCALE_KUBERNETES_VALIDATE" --strict --quiet "$out/mirror.yaml" || fail "the chart with a mirror does not validate"
"$(dirname "$GPUSCALE_KUBERNETES_VALIDATE")/python" - "$out/default.yaml" "$out/mirror.yaml" <<'PY' || fail "images, node agent or HA"
import sys, yaml
def docs(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]
def one(ds, kind, suffix):
    return next(d for d in ds if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))
default, mirror = docs(sys.argv[1]), docs(sys.argv[2])
op = one(default, "Deployment", "-operator")["spec"]
c = op["template"]["spec"]["containers"][0]
assert c["image"] == "ghcr.io/gpuscale/operator:0.1.0", c["image"]
assert "--worker-image=ghcr.io/gpuscale/inference-worker:0.1.0" in c["args"], c["args"]
assert "--lease-name=gpuscale-operator" in c["args"], c["args"]
assert op["replicas"] == 2 and op["template"]["spec"]["topologySpreadConstraints"], op
assert one(default, "PodDisruptionBudget", "-operator")["spec"]["maxUnavailable"] == 1
assert not any("--allow-host-path-models" in a for a in c["args"]), "file:// models must be opt-in"
assert not any(a.startswith("--model-cache-host-path") for a in c["args"]), "the default cache is an emptyDir"
agent = one(default, "DaemonSet", "-node-agent")["spec"]["template"]["spec"]
terms = agent["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
keys = {t["matchExpressions"][0]["key"] for t in terms}
for k in ("feature.node.kubernetes.io/pci-10de.present", "nvidia.com/gpu.present", "nvidia.com/gpu.count"):
    assert k in keys, keys
assert "runtimeClassName" not in agent and "nodeSelector" not in agent, agent
assert agent["priorityClassName"] == "system-node-critical"
assert {"key": "nvidia.com/gpu", "operator": "Exists"} in agent["tolerations"]
m = one(mirror, "Deployment", "-operator")["spec"]["template"]["spec"]
mc = m["containers"][0]
assert mc["image"] == "mirror.local:5000/gpuscale/operator@sha256:" + "0123456789abcdef" * 4, mc["image"]
assert "--worker-image=mirror.local:5000/gpuscale/inference-worker:0.1.0" in mc["args"], mc["args"]
assert "--image-pull-secret=regcred" in mc["args"], mc["args"]
for kind, suffix in (("Deployment", "-operator"), ("Deployment", "-router"), ("DaemonSet", "-node-agent")):
    spec = one(mirror, kind, suffix)["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}], (suffix, spec.get("imagePullSecrets"))
    assert spec["containers"][0]["image"].startswith("mirror.local:5000/"), spec["containers"][0]["image"]
# Least privilege: exactly the verbs the operator's API calls need (operator/src:
# reflectors list/watch; act.rs creates, patches and deletes pods, applies Services;
# the finalizer and status are patches, the finalizer after a get where the watched
# copy lacks it; blockOwnerDeletion needs finalizers/update).
role = one(default, "ClusterRole", "-operator")
got = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
want = {
    (("gpuscale.dev",), ("inferencedeployments",)): ["get", "list", "patch", "watch"],
    (("gpuscale.dev",), ("inferencedeployments/status",)): ["patch"],
    (("gpuscale.dev",), ("inferencedeployments/finalizers",)): ["update"],
    (("gpuscale.dev",), ("gpuinventories",)): ["list", "watch"],
    (("",), ("pods",)): ["create", "delete", "list", "patch", "watch"],
    (("",), ("services",)): ["create", "list", "patch", "watch"],
    (("",), ("nodes",)): ["list", "watch"],
    (("resource.k8s.io",), ("resourceslices",)): ["list", "watch"],
    (("resource.k8s.io",), ("resourceclaims",)): ["create", "list", "watch"],
    (("events.k8s.io",), ("events",)): ["create", "patch"],
}
assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
agent_role = one(default, "ClusterRole", "-node-agent")
assert {tuple(r["resources"]): sorted(r["verbs"]) for r in agent_role["rules"]} == {
    ("gpuinventories",): ["create", "patch"], ("nodes",): ["get"]}, agent_role["rules"]
vap = one(default, "ValidatingAdmissionPolicy", "-node-agent")
assert "authentication.kubernetes.io/node-name" in vap["spec"]["validations"][0]["expression"]
edit = one(default, "ClusterRole", "-edit")["metadata"]["labels"]
assert edit["rbac.authorization.k8s.io/aggregate-to-edit"] == "true", edit
assert one(default, "ClusterRole", "-view")["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
crds = [d for d in default if d["kind"] == "CustomResourceDefinition"]
assert len(crds) == 2 and all(d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for d in crds)
print("images, node agent, HA, RBAC and CRDs: ok")
PY
# Namespaced mode: no cluster-wide access to pods, Services, claims or deployments;
# a Role for the operator and the router in each served namespace.
helm template gpuscale "$CHART" --namespace gpuscale --set 'operator.watchNamespaces={team-a,team-b}' >"$out/namespaced.yaml"
"$GPUSCALE_KUBERNETES_VALIDATE" --strict --quiet "$out/namespaced.yaml" || fail "the namespaced chart does not validate"
"$(dirname "$GPUSCALE_KUBERNETES_VALIDATE")/python" - "$out/namespaced.yaml" <<'PY' || fail "namespaced RBAC"
import sys, yaml
ds = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in ds:
    if d["kind"] == "ClusterRole" and not d["metadata"].get("labels", {}).get("rbac.authorization.k8s.io/aggregate-to-view") \
            and not d["metadata"].get("labels", {}).get("rbac.authorization.k8s.io/aggregate-to-edit"):
        for r in d["rules"]:
            for res in r["resources"]:
                assert res in ("gpuinventories", "nodes", "resourceslices"), (d["metadata"]["name"], res)
    if d["kind"] == "ClusterRoleBinding":
        assert not d["metadata"]["name"].endswith("-router"), "the router needs no ClusterRole here"
roles = {(d["metadata"]["namespace"], d["metadata"]["name"].rsplit("-", 1)[1]) for d in ds if d["kind"] == "Role"}
for ns in ("team-a", "team-b"):
    assert (ns, "operator") in roles and (ns, "router") in roles, roles
args = next(d for d in ds if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator"))["spec"]["template"]["spec"]["containers"][0]["args"]
assert "--namespace=team-a" in args and "--namespace=team-b" in args, args
own = next(d for d in ds if d["kind"] == "Role" and d["metadata"]["name"].endswith("-leader-election"))
assert any(r["resources"] == ["pods"] and r["verbs"] == ["list"] for r in own["rules"]), "router pods in the operator's namespace"
print("namespaced RBAC: ok")
PY
helm template gpuscale "$CHART" --namespace gpuscale --set crds.enabled=false | grep -q "kind: CustomResourceDefinition" \
  && fail "crds.enabled=false still renders the CRDs"
# The monitoring objects (Prometheus Operator kinds, which kubernetes-validate does not
# know): the monitors' selectors, and labels kube-prometheus-stack selects by.
helm template gpuscale "$CHART" --namespace gpuscale "${MONITORING[@]}" --set monitoring.labels.release=kps >"$out/monitoring.yaml"
"$(dirname "$GPUSCALE_KUBERNETES_VALIDATE")/python" - "$out/monitoring.yaml" <<'PY' || fail "monitoring objects"
import json, sys, yaml
ds = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = {}
for d in ds:
    kinds.setdefault(d["kind"], []).append(d)
assert len(kinds["ServiceMonitor"]) == 2 and len(kinds["PodMonitor"]) == 1 and len(kinds["PrometheusRule"]) == 1, list(kinds)
for d in kinds["ServiceMonitor"] + kinds["PodMonitor"] + kinds["PrometheusRule"]:
    assert d["metadata"]["labels"]["release"] == "kps", d["metadata"]
pm = kinds["PodMonitor"][0]["spec"]
assert pm["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "gpuscale", "app.kubernetes.io/name": "inference-worker"}
dash = next(d for d in kinds["ConfigMap"] if d["metadata"]["name"].endswith("-dashboard"))
assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
assert len(json.loads(dash["data"]["gpuscale.json"])["panels"]) >= 7
alerts = {r["alert"] for g in kinds["PrometheusRule"][0]["spec"]["groups"] for r in g["rules"]}
assert {"GpuscaleKvCacheNearReservation", "GpuscaleQueueGrowingAtMaxReplicas", "GpuscaleReplicasUnschedulable", "GpuscaleWorkerErrors"} <= alerts, alerts
print("monitoring: ok")
PY

# RBAC follows the binding modes: resource.k8s.io only while DRA is on, and then only
# what the operator uses (list/watch slices; list/watch/create claims).
helm template gpuscale "$CHART" --namespace gpuscale --set nodeAgent.podResources.enabled=true >"$out/podres.yaml"
"$GPUSCALE_KUBERNETES_VALIDATE" --strict --quiet "$out/podres.yaml" || fail "the chart with PodResources does not validate"
grep -q "mountPath: /var/lib/kubelet/pod-resources" "$out/podres.yaml" || fail "PodResources on, but no socket mounted"
grep -q -- "--pod-resources-socket=$" "$out/default.yaml" || fail "PodResources off, but the agent would still dial the socket"
helm template gpuscale "$CHART" --namespace gpuscale --set binding.dra.enabled=false >"$out/nodra.yaml"
"$GPUSCALE_KUBERNETES_VALIDATE" --strict --quiet "$out/nodra.yaml" || fail "the chart without DRA does not validate"
"$(dirname "$GPUSCALE_KUBERNETES_VALIDATE")/python" - "$out/default.yaml" "$out/nodra.yaml" <<'PY' || fail "RBAC does not follow the binding modes"
import sys, yaml
def dra_rules(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-operator"))
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    rules = {tuple(r["resources"]): sorted(r["verbs"]) for r in role["rules"] if "resource.k8s.io" in r["apiGroups"]}
    return rules, args
on, on_args = dra_rules(sys.argv[1])
off, off_args = dra_rules(sys.argv[2])
assert on == {("resourceslices",): ["list", "watch"], ("resourceclaims",): ["create", "list", "watch"]}, on
assert off == {}, off
assert "--dra-driver=gpu.nvidia.com" in on_args and "--dra-driver=" in off_args, (on_args, off_args)
print("binding-mode RBAC: ok")
PY

# A price table becomes the operator's --gpu-price flags.
helm template gpuscale "$CHART" --namespace gpuscale --set pricing.gpuHourlyUSD.H100=2.49 \
  --set pricing.gpuHourlyUSD.L4=0.8 | grep -q -- "- --gpu-price=L4=0.8" \
  || fail "pricing.gpuHourlyUSD did not become --gpu-price flags"

# values.schema.json must refuse bad values with a message.
for bad in "modelCache.hostPath=/var/cache/m,modelCache.claim=models" "operator.image.digest=latest" "global.imagePullSecrets[0]=Not_A_Name" "router.holdTimeoutSeconds=0" "router.service.type=Ingress" "operator.replicas=0" "operator.logFormat=xml" "monitoring.interval=soon" "nodeAgent.bogus=1" "binding.devicePlugin.sharingResource=no slash" "binding.dra.enabled=maybe" "pricing.gpuHourlyUSD.H100=-1" "pricing.gpuHourlyUSD.H100=cheap"; do
  if helm template gpuscale "$CHART" --set "$bad" >/dev/null 2>"$out/err"; then
    fail "values.schema.json accepted --set $bad"
  fi
  grep -q "values don't meet the specifications of the schema" "$out/err" || fail "unexpected error for $bad: $(cat "$out/err")"
done
echo "chart checks: ok"
