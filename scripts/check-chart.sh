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

helm lint --strict "$CHART"
helm lint --strict "$CHART" --set metrics.serviceMonitor.enabled=true

helm template gpuscale "$CHART" --namespace gpuscale --include-crds >"$out/default.yaml"
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

# values.schema.json must refuse bad values with a message.
for bad in "router.holdTimeoutSeconds=0" "router.service.type=Ingress" "operator.replicas=0" "operator.logFormat=xml" "metrics.serviceMonitor.interval=soon" "nodeAgent.bogus=1" "binding.devicePlugin.sharingResource=no slash" "binding.dra.enabled=maybe"; do
  if helm template gpuscale "$CHART" --set "$bad" >/dev/null 2>"$out/err"; then
    fail "values.schema.json accepted --set $bad"
  fi
  grep -q "values don't meet the specifications of the schema" "$out/err" || fail "unexpected error for $bad: $(cat "$out/err")"
done
echo "chart checks: ok"
