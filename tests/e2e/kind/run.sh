#!/usr/bin/env bash
# End-to-end test on a real Kubernetes cluster (kind): builds the image, installs the mesh the
# way a user does (the Helm chart when helm exists, else the rendered YAML), deploys sample apps
# in two namespaces and checks, against the proxies' own metrics:
#
#   1. cross-node traffic in the ambient namespace is mutual TLS between the right identities;
#   2. the other namespace stays plaintext (ztunnel never sees it);
#   3. a waypoint applies a VirtualService (a weighted split, an abort and a delay) and an
#      AuthorizationPolicy denies at L7;
#   4. removing the namespace's ambient label takes it out of the mesh live, without restarting
#      its pods, and adding it back brings it in again;
#   5. `kubectl rollout restart daemonset/ztunnel` leaves new connections working;
#   6. the ingress gateway chart (as `helm install istio-ingress istio/gateway`) serves an Istio
#      Gateway and VirtualService: a client outside the mesh reaches echo through it, and echo's
#      ztunnel sees the gateway's identity over mutual TLS;
#
# and, on the way, that the CA publishes its root ConfigMap to every namespace and re-creates it.
#
# Usage: tests/e2e/kind/run.sh        (needs Docker, kind and kubectl; helm is optional)
#   KEEP_CLUSTER=1   keep the cluster afterwards (deleted by default, also on failure)
#   KIND_CLUSTER=    cluster name (default ambient-mesh-e2e); an existing one is reused
#   IMAGE=           image to build and load (default ambient-mesh:e2e)
#
# Without Docker, a running Docker daemon, kind or kubectl it says so and exits 0, so it can run
# anywhere (the Rust test tests/tests/manifests.rs checks exactly that).

# Only shell builtins until the tools are known to exist.
skip() {
    echo "skipped: $*"
    exit 0
}
command -v docker >/dev/null 2>&1 || skip "docker not found; the kind end-to-end test needs Docker, kind and kubectl"
docker info >/dev/null 2>&1 || skip "docker is installed but its daemon is not reachable (docker info failed)"
command -v kind >/dev/null 2>&1 || skip "kind not found; install it from https://kind.sigs.k8s.io to run the kind end-to-end test"
command -v kubectl >/dev/null 2>&1 || skip "kubectl not found; the kind end-to-end test needs it"

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
HERE="$ROOT/tests/e2e/kind"
CLUSTER=${KIND_CLUSTER:-ambient-mesh-e2e}
IMAGE=${IMAGE:-ambient-mesh:e2e}
MESH_NS=mesh-system
TD=cluster.local
GATEWAY_API=https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.2.1/standard-install.yaml

log() { printf '\n== %s\n' "$*"; }
fail() {
    echo "FAILED: $*" >&2
    exit 1
}

diagnostics() {
    echo "---- diagnostics" >&2
    kubectl get pods -A -o wide >&2 || true
    for target in "ds/ztunnel -n $MESH_NS" "deploy/mesh-ca -n $MESH_NS" "deploy/waypoint -n demo" \
        "deploy/istio-ingress -n istio-ingress"; do
        # shellcheck disable=SC2086 # the target is a word list on purpose
        kubectl logs $target --all-containers --tail=80 >&2 2>/dev/null || true
    done
}

cleanup() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        diagnostics
    fi
    if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
        echo "keeping cluster $CLUSTER (kind delete cluster --name $CLUSTER)"
    else
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
    exit "$status"
}

# Runs "$@" until it succeeds, at most $1 times one second apart.
retry() {
    local tries=$1
    shift
    for _ in $(seq "$tries"); do
        if "$@"; then
            return 0
        fi
        sleep 1
    done
    return 1
}

# An HTTP request from the namespace's sleep pod; prints "<status> <body>".
request() {
    local ns=$1 url=$2
    shift 2
    local out body
    out=$(kubectl exec -n "$ns" deploy/sleep -- curl -sS --max-time 10 -w '\n%{http_code}' "$@" "$url")
    body=$(printf '%s' "${out%$'\n'*}")
    echo "${out##*$'\n'} $body"
}

expect_status() {
    local want=$1 ns=$2 url=$3
    shift 3
    local got
    got=$(request "$ns" "$url" "$@" || true)
    [ "${got%% *}" = "$want" ] || { echo "  $ns -> $url $*: got '$got', want $want"; return 1; }
}

# The metrics of the ztunnel on the node of pod $1 (namespace $2), through the API server.
ztunnel_metrics_for() {
    local node pod
    node=$(kubectl get pod -n "$2" "$1" -o jsonpath='{.spec.nodeName}')
    pod=$(kubectl get pods -n "$MESH_NS" -l app=ztunnel --field-selector "spec.nodeName=$node" \
        -o jsonpath='{.items[0].metadata.name}')
    kubectl get --raw "/api/v1/namespaces/$MESH_NS/pods/$pod:15020/proxy/metrics"
}

# Sum of the istio_tcp_connections_opened_total samples whose labels contain every "$@".
opened() {
    local metrics=$1
    shift
    printf '%s\n' "$metrics" | grep '^istio_tcp_connections_opened_total{' | {
        local sum=0 line ok label
        while IFS= read -r line; do
            ok=1
            for label in "$@"; do
                [[ $line == *"$label"* ]] || ok=0
            done
            [ "$ok" = 1 ] && sum=$((sum + ${line##* }))
        done
        echo "$sum"
    }
}

pod_of() { kubectl get pods -n "$1" -l "$2" -o jsonpath='{.items[0].metadata.name}'; }

trap cleanup EXIT

log "cluster $CLUSTER: one control plane, two workers"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    echo "reusing the existing cluster"
else
    kind create cluster --name "$CLUSTER" --wait 180s --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
- role: worker
- role: worker
EOF
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null
kubectl label node "$CLUSTER-worker" e2e.ambient-mesh/role=client --overwrite >/dev/null
kubectl label node "$CLUSTER-worker2" e2e.ambient-mesh/role=server --overwrite >/dev/null

log "image $IMAGE"
docker build -t "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"
repo=${IMAGE%:*}
tag=${IMAGE##*:}

log "the mesh"
kubectl apply -f "$ROOT/manifests/namespace.yaml"
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f -
kubectl create namespace plain --dry-run=client -o yaml | kubectl apply -f -
if command -v helm >/dev/null 2>&1; then
    echo "installing with helm"
    # No --wait: the checks below wait for the CA, its root ConfigMap and ztunnel.
    helm upgrade --install ambient-mesh "$ROOT/manifests/chart/ambient-mesh" -n "$MESH_NS" \
        --set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy=Never \
        --set trustDomain="$TD"
else
    echo "helm not found; installing the rendered YAML with kubectl"
    sed -e "s|image: ambient-mesh:0.1.0|image: $IMAGE|" -e 's|imagePullPolicy: IfNotPresent|imagePullPolicy: Never|' \
        "$ROOT/manifests/rendered/ambient-mesh.yaml" | kubectl apply -f -
fi
kubectl wait --for condition=established --timeout=60s \
    crd/virtualservices.networking.istio.io crd/destinationrules.networking.istio.io \
    crd/authorizationpolicies.security.istio.io crd/peerauthentications.security.istio.io \
    crd/gateways.networking.istio.io
kubectl rollout status -n "$MESH_NS" deploy/mesh-ca --timeout=180s
# The CA made its root on first start and keeps it in every namespace as the ConfigMap
# mesh-ca-root-cert, which ztunnel (and demo's waypoint) mount; it re-creates a deleted one.
root_published() {
    local ns
    for ns in "$MESH_NS" demo plain; do
        kubectl get configmap mesh-ca-root-cert -n "$ns" -o 'jsonpath={.data.root-cert\.pem}' 2>/dev/null \
            | grep -q 'BEGIN CERTIFICATE' || return 1
    done
}
retry 60 root_published || fail "the CA did not publish its root ConfigMap mesh-ca-root-cert to $MESH_NS, demo and plain"
kubectl delete configmap mesh-ca-root-cert -n plain
retry 30 root_published || fail "the CA did not re-create the root ConfigMap deleted from plain"
kubectl rollout status -n "$MESH_NS" ds/ztunnel --timeout=180s

gateway=false
if kubectl apply -f "$GATEWAY_API" >/dev/null 2>&1; then
    kubectl wait --for condition=established --timeout=60s crd/gateways.gateway.networking.k8s.io
    kubectl apply -f "$ROOT/manifests/gatewayclass.yaml"
    gateway=true
else
    echo "could not install the Gateway API CRDs from $GATEWAY_API; going on without a Gateway object"
fi

log "sample apps in demo (ambient) and plain"
for ns in demo plain; do
    kubectl apply -n "$ns" -f "$HERE/apps.yaml"
done
for ns in demo plain; do
    for d in sleep echo-v1 echo-v2; do
        kubectl rollout status -n "$ns" "deploy/$d" --timeout=180s
    done
done
sleep_pod=$(pod_of demo app=sleep)
echo_pod=$(pod_of demo app=echo,version=v1)
uids_before=$(kubectl get pods -n demo -o jsonpath='{.items[*].metadata.uid}')
kubectl label namespace demo istio.io/dataplane-mode=ambient --overwrite

SLEEP_ID="source_principal=\"spiffe://$TD/ns/demo/sa/sleep\""
ECHO_ID="destination_principal=\"spiffe://$TD/ns/demo/sa/echo\""
MTLS='connection_security_policy="mutual_tls"'

log "1. cross-node traffic in demo is mutual TLS, sleep -> echo"
retry 60 expect_status 200 demo http://echo.demo/ || fail "demo/sleep cannot reach echo after enrolment"
for _ in $(seq 10); do expect_status 200 demo http://echo.demo/ || fail "request failed"; done
metrics=$(ztunnel_metrics_for "$echo_pod" demo)
n=$(opened "$metrics" 'reporter="destination"' "$SLEEP_ID" "$ECHO_ID" "$MTLS")
[ "$n" -ge 10 ] || fail "echo's ztunnel saw $n mTLS connections from sleep's identity, want >= 10"
echo "echo's ztunnel: $n connections from spiffe://$TD/ns/demo/sa/sleep over mutual TLS"
[ "$(kubectl get pod -n demo "$sleep_pod" -o jsonpath='{.spec.nodeName}')" != \
  "$(kubectl get pod -n demo "$echo_pod" -o jsonpath='{.spec.nodeName}')" ] || fail "sleep and echo share a node"

log "2. the plain namespace stays out of the mesh"
for _ in $(seq 5); do expect_status 200 plain http://echo.plain/ || fail "plain traffic failed"; done
plain_echo=$(pod_of plain app=echo,version=v1)
n=$(opened "$(ztunnel_metrics_for "$plain_echo" plain)" 'destination_workload_namespace="plain"')
[ "$n" = 0 ] || fail "ztunnel reported $n connections to the plain namespace"
expect_status 200 demo http://echo.plain/ || fail "ambient -> plain (passthrough) failed"
echo "plain -> plain and ambient -> plain work; ztunnel never saw plain's connections"

log "3. a waypoint for demo: VirtualService split, fault, AuthorizationPolicy"
if command -v helm >/dev/null 2>&1; then
    helm upgrade --install waypoint "$ROOT/manifests/chart/waypoint" -n demo \
        --set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy=Never \
        --set gateway="$gateway" --set trustDomain="$TD" --wait --timeout 3m
else
    sed -e "s|image: ambient-mesh:0.1.0|image: $IMAGE|" -e 's|imagePullPolicy: IfNotPresent|imagePullPolicy: Never|' \
        -e 's|namespace: default$|namespace: demo|' -e 's|mesh-waypoint-default-|mesh-waypoint-demo-|' \
        "$ROOT/manifests/rendered/waypoint.yaml" | kubectl apply -f -
    if [ "$gateway" = true ]; then
        kubectl apply -n demo -f - <<'EOF'
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
EOF
    fi
fi
kubectl rollout status -n demo deploy/waypoint --timeout=180s
kubectl label namespace demo istio.io/use-waypoint=waypoint --overwrite
kubectl apply -n demo -f - <<'EOF'
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v1}}]
  - match: [{headers: {x-fault: {exact: delay}}}]
    fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v1}}]
  - route:
    - {destination: {host: echo, subset: v1}, weight: 0}
    - {destination: {host: echo, subset: v2}, weight: 100}
EOF
all_v2() { [ "$(request demo http://echo.demo/)" = "200 v2" ]; }
retry 60 all_v2 || fail "the waypoint did not apply the 0/100 split: $(request demo http://echo.demo/)"
for _ in $(seq 10); do all_v2 || fail "a request escaped the 0/100 split"; done
echo "0/100: every request answered by v2"
kubectl patch -n demo virtualservice echo --type=json \
    -p '[{"op":"replace","path":"/spec/http/2/route/0/weight","value":50},{"op":"replace","path":"/spec/http/2/route/1/weight","value":50}]'
seen_both() {
    local v1=0 v2=0 body
    for _ in $(seq 40); do
        body=$(request demo http://echo.demo/)
        [ "$body" = "200 v1" ] && v1=$((v1 + 1))
        [ "$body" = "200 v2" ] && v2=$((v2 + 1))
    done
    echo "  50/50 over 40 requests: v1=$v1 v2=$v2"
    [ "$v1" -gt 0 ] && [ "$v2" -gt 0 ] && [ $((v1 + v2)) = 40 ]
}
retry 10 seen_both || fail "the 50/50 split did not reach both versions"
expect_status 503 demo http://echo.demo/ -H 'x-fault: abort' || fail "the abort fault was not applied"
start=$SECONDS
expect_status 200 demo http://echo.demo/ -H 'x-fault: delay' || fail "the delayed request failed"
[ $((SECONDS - start)) -ge 2 ] || fail "the delay fault was not applied"
echo "abort -> 503, delay -> 2 s"

kubectl apply -n demo -f - <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: DENY
  rules:
  - from: [{source: {principals: ["$TD/ns/demo/sa/sleep"]}}]
    to: [{operation: {paths: ["/admin*"]}}]
EOF
retry 30 expect_status 403 demo http://echo.demo/admin || fail "the DENY policy was not applied"
expect_status 200 demo http://echo.demo/ || fail "the DENY policy denied more than /admin"
echo "DENY: /admin -> 403, / -> 200"
kubectl delete -n demo authorizationpolicy deny-admin
kubectl label namespace demo istio.io/use-waypoint-
kubectl delete -n demo virtualservice echo
retry 30 expect_status 200 demo http://echo.demo/admin || fail "traffic did not return to direct after removing the waypoint"

log "4. un-labelling demo takes it out of the mesh live, without restarting pods"
kubectl label namespace demo istio.io/dataplane-mode-
quiet_count() { opened "$(ztunnel_metrics_for "$echo_pod" demo)" "$SLEEP_ID" "$ECHO_ID"; }
settled() {
    local a b
    a=$(quiet_count)
    expect_status 200 demo http://echo.demo/ || return 1
    b=$(quiet_count)
    [ "$a" = "$b" ]
}
retry 30 settled || fail "ztunnel still carries demo's connections after the label was removed"
for _ in $(seq 5); do expect_status 200 demo http://echo.demo/ || fail "plain traffic failed after leaving the mesh"; done
[ "$(kubectl get pods -n demo -l 'app in (sleep,echo)' -o jsonpath='{.items[*].metadata.uid}')" != "" ] || fail "pods gone"
for uid in $(kubectl get pods -n demo -l 'app in (sleep,echo)' -o jsonpath='{.items[*].metadata.uid}'); do
    [[ " $uids_before " == *" $uid "* ]] || fail "pod $uid was (re)created"
done
restarts=$(kubectl get pods -n demo -l 'app in (sleep,echo)' -o jsonpath='{.items[*].status.containerStatuses[*].restartCount}')
[ -z "${restarts//[0 ]/}" ] || fail "containers restarted: $restarts"
echo "plaintext again, same pods, no restarts"
kubectl label namespace demo istio.io/dataplane-mode=ambient --overwrite
enrolled_again() {
    local a b
    a=$(quiet_count)
    expect_status 200 demo http://echo.demo/ || return 1
    b=$(quiet_count)
    [ "$b" -gt "$a" ]
}
retry 30 enrolled_again || fail "re-labelling did not bring demo back into the mesh"
echo "back in the mesh"

log "5. rollout restart of the ztunnel DaemonSet"
kubectl rollout restart -n "$MESH_NS" ds/ztunnel
kubectl rollout status -n "$MESH_NS" ds/ztunnel --timeout=180s
retry 60 expect_status 200 demo http://echo.demo/ || fail "no traffic after the ztunnel restart"
for _ in $(seq 10); do expect_status 200 demo http://echo.demo/ || fail "request failed after the restart"; done
n=$(opened "$(ztunnel_metrics_for "$echo_pod" demo)" 'reporter="destination"' "$SLEEP_ID" "$ECHO_ID" "$MTLS")
[ "$n" -ge 10 ] || fail "the new ztunnel saw $n mTLS connections from sleep, want >= 10"
echo "new ztunnels carry mTLS traffic ($n connections)"

log "6. the ingress gateway chart: outside the mesh -> gateway -> HBONE -> echo"
kubectl create namespace istio-ingress --dry-run=client -o yaml | kubectl apply -f -
# ClusterIP: kind has no load balancer; the client is plain's sleep, outside the mesh.
if command -v helm >/dev/null 2>&1; then
    helm upgrade --install istio-ingress "$ROOT/manifests/chart/gateway" -n istio-ingress \
        --set image.repository="$repo" --set image.tag="$tag" --set image.pullPolicy=Never \
        --set service.type=ClusterIP --set trustDomain="$TD"
else
    sed -e "s|image: ambient-mesh:0.1.0|image: $IMAGE|" -e 's|imagePullPolicy: IfNotPresent|imagePullPolicy: Never|' \
        -e 's|type: LoadBalancer|type: ClusterIP|' "$ROOT/manifests/rendered/gateway.yaml" | kubectl apply -f -
fi
kubectl rollout status -n istio-ingress deploy/istio-ingress --timeout=180s
kubectl apply -n demo -f - <<'EOF'
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: echo-gateway}
spec:
  selector: {istio: ingress}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [echo.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-ingress}
spec:
  hosts: [echo.example.com]
  gateways: [echo-gateway]
  http:
  - route: [{destination: {host: echo, port: {number: 80}}}]
EOF
INGRESS=http://istio-ingress.istio-ingress/
through_gateway() { expect_status "$1" plain "$INGRESS" -H "Host: $2"; }
retry 60 through_gateway 200 echo.example.com \
    || fail "no answer from echo through the ingress gateway: $(request plain "$INGRESS" -H 'Host: echo.example.com')"
for _ in $(seq 5); do through_gateway 200 echo.example.com || fail "a request through the gateway failed"; done
through_gateway 404 other.example.com || fail "the gateway routed a host no VirtualService names"
GATEWAY_ID="source_principal=\"spiffe://$TD/ns/istio-ingress/sa/istio-ingress\""
n=$(opened "$(ztunnel_metrics_for "$echo_pod" demo)" 'reporter="destination"' "$GATEWAY_ID" "$ECHO_ID" "$MTLS")
[ "$n" -ge 1 ] || fail "echo's ztunnel saw no mTLS connection from the gateway's identity"
echo "through the gateway: 200 for echo.example.com, 404 for other hosts; echo's ztunnel saw the gateway's identity over mTLS ($n connections)"

log "PASS: kind end-to-end"
