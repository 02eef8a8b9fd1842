# A one-node Kubernetes v1.20 cluster from Debian 12's own packages, sourced by .ci/run after provision.sh (it
# needs the Docker engine, and uses ci_say, ci_apt_install and ci_cleanups from there).
#
# No Kubernetes server binary is packaged for Debian 12, but its source package `kubernetes` is (1.20.2 with
# Debian's patches): the binaries are built from it once per machine and kept in $ZOOMCAMP_CACHE. etcd is Debian's
# etcd-server, the kubelet runs pods on the Docker engine through its built-in dockershim, pods get Docker's bridge
# addresses, kube-proxy makes the Services in iptables. No CoreDNS is packaged anywhere reachable: a stand-in,
# dnsmasq fed from the API's Services and Endpoints (.ci/cluster_dns.py), answers the cluster's names with the
# same records, the same TTL and the same 30 s cache (ci_k8s_dns). Everything started here is stopped again, and the pods' containers removed, when .ci/run ends.

ZOOMCAMP_CACHE=${ZOOMCAMP_CACHE:-/var/cache/zoomcamp-10}
K8S_VERSION=v1.20.2
K8S_BIN=$ZOOMCAMP_CACHE/kubernetes-$K8S_VERSION/bin
K8S_WORK=/var/lib/zoomcamp-10-cluster
K8S_NODE=zoomcamp-10
K8S_SERVICE_RANGE=10.96.0.0/16
K8S_PAUSE_IMAGE=zoomcamp-10-pause:3.2

# The private apt state that reaches Debian 12's source and binary packages without touching the system's.
ci_k8s_apt() {
  local state=$ZOOMCAMP_CACHE/apt mirror
  mirror=$(ci_debian_mirror)
  mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
  printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bookworm main\ndeb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bookworm main\n' \
    "$mirror" "$mirror" >"$state/sources.list"
  apt-get -o APT::Sandbox::User=root -o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=- \
    -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache" -o Dir::State::Status=/dev/null "$@"
}

# The server binaries, built from Debian's source package once per machine: 324-460 s measured cold on 2 cores,
# allowed K8S_BUILD_BUDGET seconds.
K8S_BUILD_BUDGET=1800
ci_k8s_binaries() {
  if [ -x "$K8S_BIN/kubelet" ] && "$K8S_BIN/kubelet" --version 2>/dev/null | grep -q "$K8S_VERSION"; then
    ci_say "Kubernetes $K8S_VERSION binaries: built earlier, in $K8S_BIN"
  else
    local started=$SECONDS src=$ZOOMCAMP_CACHE/src
    ci_apt_install dpkg-dev golang-go rsync jq
    ci_say "building Kubernetes $K8S_VERSION from Debian's source package (once per machine: 5-8 minutes on 2 cores, allowed $K8S_BUILD_BUDGET s)"
    rm -rf "$src" && mkdir -p "$src"
    ci_k8s_apt update -q >/dev/null
    (cd "$src" && ci_k8s_apt source -q kubernetes >/dev/null)
    local tree
    tree=$(find "$src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes*' | head -n 1)
    ci_k8s_oom_scores "$tree"
    mkdir -p "$tree/.go/src/k8s.io" "$ZOOMCAMP_CACHE/go-build"
    ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
    (cd "$tree" && HOME=$src GOPATH=$tree/.go GOCACHE=$ZOOMCAMP_CACHE/go-build CGO_ENABLED=0 timeout $K8S_BUILD_BUDGET \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy cmd/kubeadm cmd/kubectl" \
      >"$src/build.log" 2>&1) || {
      tail -n 40 "$src/build.log" >&2
      ci_say "the Kubernetes build failed or took over $K8S_BUILD_BUDGET s (after $((SECONDS - started)) s)"
      return 1
    }
    mkdir -p "$K8S_BIN"
    cp "$tree"/_output/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy,kubeadm,kubectl} "$K8S_BIN/"
    # The pause container every pod starts with, from the same tree: a static binary, no base image needed.
    gcc -Os -static -o "$K8S_BIN/pause" "$tree/build/pause/linux/pause.c"
    rm -rf "$src"
    ci_say "built the Kubernetes binaries in $((SECONDS - started)) s"
  fi
  if [ ! -x "$K8S_BIN/etcd" ]; then
    local debs
    debs=$(mktemp -d)
    ci_k8s_apt update -q >/dev/null
    (cd "$debs" && ci_k8s_apt download -q etcd-server >/dev/null)
    dpkg-deb -x "$debs"/etcd-server_*.deb "$debs/root"  # unpacked, not installed: its postinst starts a service
    cp "$debs/root/usr/bin/etcd" "$K8S_BIN/"
    rm -rf "$debs"
  fi
}

# Where root cannot lower a process's OOM score (no CAP_SYS_RESOURCE, as on the machines here), Docker refuses the
# -998 the kubelet gives every pod's sandbox, and no pod starts: there the kubelet is built with 0 instead (and for
# Guaranteed pods' containers, -997). Nothing else of Debian's tree changes.
ci_k8s_oom_scores() {
  local tree=$1
  sh -c 'echo -1 >/proc/self/oom_score_adj' 2>/dev/null && return 0
  sed -i 's/defaultSandboxOOMAdj int = -998/defaultSandboxOOMAdj int = 0/' "$tree/pkg/kubelet/dockershim/docker_sandbox.go"
  sed -i 's/guaranteedOOMScoreAdj int = -997/guaranteedOOMScoreAdj int = 0/' "$tree/pkg/kubelet/qos/policy.go"
  grep -q 'defaultSandboxOOMAdj int = 0' "$tree/pkg/kubelet/dockershim/docker_sandbox.go" \
    && grep -q 'guaranteedOOMScoreAdj int = 0' "$tree/pkg/kubelet/qos/policy.go" \
    || { ci_say "could not set the kubelet's OOM score adjustments to 0"; return 1; }
  ci_say "root cannot lower OOM scores here: the kubelet is built with the sandboxes' score adjustment at 0, not -998"
}

ci_k8s_pause_image() {
  docker image inspect "$K8S_PAUSE_IMAGE" >/dev/null 2>&1 && return 0
  local dir
  dir=$(mktemp -d)
  cp "$K8S_BIN/pause" "$dir/pause"
  tar -C "$dir" -cf "$dir/pause.tar" pause
  docker import --change 'ENTRYPOINT ["/pause"]' "$dir/pause.tar" "$K8S_PAUSE_IMAGE" >/dev/null
  rm -rf "$dir"
}

# Start one component in the background, its log in the work folder, stopped when .ci/run ends.
ci_k8s_start() {
  local name=$1
  shift
  "$@" >"$K8S_WORK/logs/$name.log" 2>&1 &
  ci_cleanups+=("ci_k8s_stop $! $name")
}

ci_k8s_stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  local waited=0
  while kill -0 "$1" 2>/dev/null && [ $waited -lt 20 ]; do sleep 0.5; waited=$((waited + 1)); done
  kill -KILL "$1" 2>/dev/null || true
}

ci_k8s_wait() {
  local what=$1 seconds=$2
  shift 2
  local waited=0
  until "$@" >/dev/null 2>&1; do
    if [ $waited -ge "$seconds" ]; then
      ci_say "$what did not come up in $seconds s; the logs:"
      tail -n 20 "$K8S_WORK"/logs/*.log >&2
      return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
}

ci_k8s_certificates() {
  local address=$1
  cat >"$K8S_WORK/kubeadm.yaml" <<EOF
apiVersion: kubeadm.k8s.io/v1beta2
kind: InitConfiguration
localAPIEndpoint: {advertiseAddress: $address, bindPort: 6443}
nodeRegistration: {name: $K8S_NODE}
---
apiVersion: kubeadm.k8s.io/v1beta2
kind: ClusterConfiguration
kubernetesVersion: $K8S_VERSION
certificatesDir: $K8S_WORK/pki
networking: {serviceSubnet: $K8S_SERVICE_RANGE, dnsDomain: cluster.local}
EOF
  "$K8S_BIN/kubeadm" init phase certs all --config "$K8S_WORK/kubeadm.yaml" >/dev/null
  "$K8S_BIN/kubeadm" init phase kubeconfig all --config "$K8S_WORK/kubeadm.yaml" --kubeconfig-dir "$K8S_WORK" >/dev/null
}

ci_k8s_kubelet_config() {
  local dns=$1
  cat >"$K8S_WORK/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $K8S_WORK/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
clusterDNS: [$dns]
clusterDomain: cluster.local
failSwapOn: false
# A shared CI machine's disk is not the node's to guard: no evictions for it.
evictionHard: {memory.available: 100Mi, nodefs.available: "0%", imagefs.available: "0%"}
imageGCHighThresholdPercent: 100
EOF
}

ci_kubernetes() {
  if ! timeout 10 docker info >/dev/null 2>&1 || ! ci_can_apt; then
    ci_lacks "no Docker engine, or no root with apt: no Kubernetes cluster, the cluster tests will skip"
    return
  fi
  local started=$SECONDS
  # socat: the kubelet's dockershim forwards ports with it (`kubectl port-forward`, as notebook 06 uses it).
  ci_apt_install gcc libc6-dev iptables conntrack dnsmasq-base socat
  ci_k8s_binaries
  ci_k8s_pause_image
  # The node's address, and Docker's bridge: the pods' network, whose address on this machine serves their DNS.
  local address dns pods
  address=$(hostname -I | awk '{print $1}')
  dns=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)
  pods=$(ip -4 -o route show dev docker0 scope link | awk '{print $1}')
  ci_k8s_unmount
  rm -rf "$K8S_WORK" && mkdir -p "$K8S_WORK/logs" "$K8S_WORK/dns"
  ci_k8s_certificates "$address"
  ci_k8s_kubelet_config "$dns"
  local pki=$K8S_WORK/pki
  ci_k8s_start etcd "$K8S_BIN/etcd" --data-dir "$K8S_WORK/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
  ci_k8s_start apiserver "$K8S_BIN/kube-apiserver" --advertise-address="$address" --secure-port=6443 \
    --etcd-servers=http://127.0.0.1:2379 --service-cluster-ip-range=$K8S_SERVICE_RANGE --allow-privileged=true \
    --client-ca-file="$pki/ca.crt" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction --kubelet-preferred-address-types=InternalIP
  export KUBECONFIG=$K8S_WORK/admin.conf
  ci_k8s_wait "the API server" 120 "$K8S_BIN/kubectl" get --raw=/readyz
  ci_k8s_start controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$K8S_WORK/controller-manager.conf" \
    --authentication-kubeconfig="$K8S_WORK/controller-manager.conf" --authorization-kubeconfig="$K8S_WORK/controller-manager.conf" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" --root-ca-file="$pki/ca.crt" \
    --service-account-private-key-file="$pki/sa.key" --use-service-account-credentials=true --leader-elect=false \
    --bind-address=127.0.0.1
  ci_k8s_start scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$K8S_WORK/scheduler.conf" --leader-elect=false \
    --bind-address=127.0.0.1
  # Registered before the kubelet starts, so that it runs after the kubelet has stopped (cleanups run last first).
  ci_cleanups+=("ci_k8s_remove_pods")
  ci_k8s_start kubelet "$K8S_BIN/kubelet" --config="$K8S_WORK/kubelet.yaml" --kubeconfig="$K8S_WORK/kubelet.conf" \
    --container-runtime=docker --pod-infra-container-image=$K8S_PAUSE_IMAGE --hostname-override=$K8S_NODE \
    --node-ip="$address" --root-dir="$K8S_WORK/kubelet"
  ci_k8s_start proxy "$K8S_BIN/kube-proxy" --kubeconfig="$K8S_WORK/admin.conf" --hostname-override=$K8S_NODE \
    --proxy-mode=iptables --cluster-cidr="$pods"
  ci_k8s_dns "$dns"
  ci_k8s_wait "the node" 120 "$K8S_BIN/kubectl" wait --for=condition=Ready node/$K8S_NODE --timeout=5s
  ci_say "Kubernetes $K8S_VERSION up in $((SECONDS - started)) s: node $K8S_NODE at $address, DNS stand-in at $dns"
  # Here, a cluster is part of the machine: the cluster tests must run, and fail rather than skip. Its kubectl is
  # of its own version (the environment's is far newer).
  export ZOOMCAMP_REQUIRE_CLUSTER=1 ZOOMCAMP_KUBECTL=$K8S_BIN/kubectl
}

# The cluster's DNS as a kubeadm cluster's CoreDNS serves it (its Corefile: `kubernetes cluster.local ... { ttl 30 }`,
# `forward . /etc/resolv.conf`, `cache 30`): the records, fed from the API by .ci/cluster_dns.py, come from an
# authority on loopback with a TTL of K8S_DNS_TTL seconds; in front of it, on the pods' DNS address, a cache keeps each
# answer (an empty one too) for that long, and sends names outside cluster.local to this machine's own resolvers. So
# a gateway sees a new or a removed model pod up to 30 s late, as it would on such a cluster.
K8S_DNS_TTL=30
ci_k8s_dns() {
  local address=$1 records=127.0.0.1#5354
  ci_k8s_start dns-records dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces \
    --listen-address=127.0.0.1 --port=5354 --local=/cluster.local/ --local-ttl=$K8S_DNS_TTL \
    --addn-hosts="$K8S_WORK/dns/hosts" --pid-file="$K8S_WORK/dns/records.pid" --log-facility=-
  ci_k8s_start dns dnsmasq --keep-in-foreground --no-hosts --bind-interfaces --listen-address="$address" \
    --server="/cluster.local/$records" --resolv-file=/etc/resolv.conf --cache-size=1000 \
    --max-cache-ttl=$K8S_DNS_TTL --neg-ttl=$K8S_DNS_TTL --pid-file="$K8S_WORK/dns/cache.pid" --log-facility=-
  ci_k8s_start dns-feed python3 .ci/cluster_dns.py "$K8S_WORK/dns/hosts" "$K8S_WORK/dns/records.pid" "$K8S_BIN/kubectl"
}

# The volumes the kubelet mounted for its pods (service-account tokens, emptyDirs in memory).
ci_k8s_unmount() {
  awk -v root="$K8S_WORK/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount
}

# The pods' containers the kubelet left (k8s_ names) and their volumes, removed once the kubelet is stopped.
ci_k8s_remove_pods() {
  local containers
  containers=$(docker ps -aq --filter name=k8s_)
  [ -n "$containers" ] && docker rm -f $containers >/dev/null
  ci_k8s_unmount
  iptables-save | grep -q KUBE- && ci_say "kube-proxy's iptables chains stay until the machine restarts"
  return 0
}
