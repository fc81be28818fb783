"""Checks on rendered manifests that a schema cannot make: the rules deploy/k8s/README.md promises.

    check-manifests.py RENDERED.yaml [CLIENTS]

Run by validate.sh with the Python of the Kubernetes tools venv (it has PyYAML). Prints one line per
failed rule and exits 1 if any failed.
"""

import re
import sys

import yaml

path = sys.argv[1]
expected_clients = int(sys.argv[2]) if len(sys.argv) > 2 else None
docs = [d for d in yaml.safe_load_all(open(path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
failures = []


def fail(msg):
    failures.append(msg)


configmaps = by_kind.get("ConfigMap", {})
sets = by_kind.get("StatefulSet", {})
for name in ("coordinator", "client"):
    if name not in sets:
        fail(f"no StatefulSet {name}")
if failures:
    print("\n".join(f"{path}: {f}" for f in failures))
    sys.exit(1)

coordinator, client = sets["coordinator"], sets["client"]
if coordinator["spec"].get("replicas") != 1:
    fail("the coordinator StatefulSet must have exactly 1 replica")
for s, volume, mount in ((coordinator, "state", "/var/lib/fedtext"), (client, "identity", "/var/lib/fedtext")):
    name = s["metadata"]["name"]
    claims = [t["metadata"]["name"] for t in s["spec"].get("volumeClaimTemplates", [])]
    if volume not in claims:
        fail(f"{name}: no PersistentVolumeClaim template {volume!r}")
    main = s["spec"]["template"]["spec"]["containers"][0]
    if not any(m["name"] == volume and m["mountPath"] == mount for m in main.get("volumeMounts", [])):
        fail(f"{name}: {volume!r} is not mounted on {mount}")

services = by_kind.get("Service", {})
if "coordinator" not in services or not any(p.get("port") == 7443 for p in services["coordinator"]["spec"].get("ports", [])):
    fail("no Service coordinator on port 7443 (clients dial https://coordinator:7443)")

main = coordinator["spec"]["template"]["spec"]["containers"][0]
for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
    if probe not in main:
        fail(f"coordinator: no {probe}")

for s in sets.values():
    name = s["metadata"]["name"]
    pod = s["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("runAsUser", 0) == 0:
        fail(f"{name}: the pod must run as a non-root uid (runAsNonRoot, runAsUser)")
    if pod.get("automountServiceAccountToken") is not False:
        fail(f"{name}: the pod needs no Kubernetes API token (automountServiceAccountToken: false)")
    env_names = set()
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"{where}: root filesystem must be read-only")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(f"{where}: must drop ALL capabilities")
        defined = {e["name"] for e in c.get("env", [])}
        for ref in c.get("envFrom", []):
            cm = ref.get("configMapRef", {}).get("name")
            if cm is not None:
                if cm not in configmaps:
                    fail(f"{where}: envFrom names a ConfigMap {cm} that is not rendered")
                else:
                    defined |= set(configmaps[cm].get("data", {}))
        # $(VAR) in command and args expands only when VAR is defined; otherwise it stays as text.
        for arg in c.get("command", []) + c.get("args", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(arg)):
                if var not in defined:
                    fail(f"{where}: $({var}) in its arguments is not defined")
        env_names |= defined

cm = configmaps[next(iter(configmaps))]["data"] if len(configmaps) == 1 else {}
replicas = client["spec"].get("replicas")
if cm.get("FL_CLIENTS") != str(replicas):
    fail(f"FL_CLIENTS={cm.get('FL_CLIENTS')} but the client StatefulSet has {replicas} replicas")
if int(cm.get("FL_MIN_CLIENTS", "0")) > int(replicas or 0):
    fail(f"FL_MIN_CLIENTS={cm.get('FL_MIN_CLIENTS')} is more than the {replicas} client pods")
if expected_clients is not None and replicas != expected_clients:
    fail(f"expected {expected_clients} client pods, rendered {replicas}")
token = [v for v in client["spec"]["template"]["spec"].get("volumes", []) if "secret" in v]
if not token or token[0]["secret"].get("secretName") != "fedtext-join-token":
    fail("clients must read the join token from the Secret fedtext-join-token")

if failures:
    print("\n".join(f"{path}: {f}" for f in failures))
    sys.exit(1)
print(f"{path}: {len(docs)} resources, {replicas} clients: policy checks passed")
