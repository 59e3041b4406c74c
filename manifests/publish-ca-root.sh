#!/usr/bin/env bash
# Publishes the mesh's root certificate as the ConfigMap `mesh-ca-root-cert` (key
# root-cert.pem), which ztunnel and the waypoints read to trust the CA and each other.
#
#   manifests/publish-ca-root.sh [--mesh-namespace mesh-system] [--timeout 180] [NAMESPACE...]
#
# The root is read from the CA's Secret `mesh-ca` (waiting for the CA to create it on its first
# start): its root-cert.pem when it has one (a plugged-in intermediate, Istio's cacerts), else
# ca-cert.pem (the CA's own self-signed root). The ConfigMap goes to the mesh namespace and to
# every NAMESPACE given: the namespaces that run a waypoint. Istio's istiod publishes its root
# to every namespace itself; this mesh's CA does not (yet), so run this again with the namespace
# whenever you add a waypoint to a new namespace. Safe to run again.
set -euo pipefail

mesh_ns=mesh-system
timeout=180
namespaces=()
while [ $# -gt 0 ]; do
    case "$1" in
        --mesh-namespace) mesh_ns=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) namespaces+=("$1"); shift ;;
    esac
done
command -v kubectl >/dev/null || { echo "publish-ca-root.sh needs kubectl" >&2; exit 1; }

root=""
for _ in $(seq "$timeout"); do
    for key in 'root-cert\.pem' 'ca-cert\.pem'; do
        root=$(kubectl get secret mesh-ca -n "$mesh_ns" -o "jsonpath={.data.$key}" 2>/dev/null || true)
        [ -n "$root" ] && break 2
    done
    sleep 1
done
if [ -z "$root" ]; then
    echo "no Secret $mesh_ns/mesh-ca with root-cert.pem or ca-cert.pem after ${timeout}s: is the CA (deploy/mesh-ca) running?" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '%s' "$root" | base64 -d >"$work/root-cert.pem"
grep -q 'BEGIN CERTIFICATE' "$work/root-cert.pem" || { echo "the CA Secret's root is not a PEM certificate" >&2; exit 1; }
for ns in "$mesh_ns" "${namespaces[@]}"; do
    kubectl create configmap mesh-ca-root-cert -n "$ns" \
        --from-file=root-cert.pem="$work/root-cert.pem" --dry-run=client -o yaml \
        | kubectl apply -f - >/dev/null
    echo "configmap $ns/mesh-ca-root-cert holds the mesh's root"
done
