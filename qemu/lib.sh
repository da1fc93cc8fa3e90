# Shared by qemu/demo.sh, qemu/bench.sh and qemu/soak.sh (sourced, not run).
#
# Network setup lives only in namespaces created here (addresses in 198.18.0.0/15 and
# 2001:2::/48), and everything started is recorded so that vp_cleanup ends exactly those
# processes, by PID, and deletes exactly those namespaces.

VP_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VP_BIN="$VP_REPO/target/release/vhost-packet"
VP_GUEST_MAC="52:54:00:12:34:56"
VP_GUEST_IP=198.18.0.1
VP_PEER_IP=198.18.0.2
VP_GUEST_IP6=2001:2::1
VP_PEER_IP6=2001:2::2
VP_PIDS=()
VP_NAMESPACES=()
VP_TMP=""

vp_say() { echo "$(basename "$0" .sh): $*" >&2; }
vp_die() { vp_say "$*"; exit 1; }

# Installs the Debian packages that are missing (as root, with apt-get), or names them.
vp_need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        vp_say "installing ${missing[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
            vp_die "apt-get install ${missing[*]} failed"
    else
        vp_die "needs the Debian packages: ${missing[*]}"
    fi
}

vp_require_root() {
    [ "$(id -u)" -eq 0 ] || vp_die "needs root (network namespaces, packet sockets): sudo $0"
}

vp_build() {
    command -v cargo >/dev/null || vp_die "needs cargo (https://rustup.rs)"
    vp_say "building vhost-packet (cargo build --release)"
    (cd "$VP_REPO" && cargo build --release --quiet) || vp_die "cargo build failed"
    "$VP_REPO/qemu/build-guest.sh"
}

# vp_cleanup: on exit, also after a failure or a signal (trap vp_cleanup EXIT).
vp_cleanup() {
    local pid ns
    for pid in "${VP_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${VP_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for ns in "${VP_NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    [ -n "$VP_TMP" ] && rm -rf "$VP_TMP"
    return 0
}

# vp_netns TAG: namespaces $VP_HOST_NS (vhost-packet's side, interface vh0) and $VP_PEER_NS
# (vp0 with $VP_PEER_IP/24 and $VP_PEER_IP6/64), joined by a veth pair. MTU from $1 if given.
vp_netns() {
    local tag="$1" mtu="${2:-}"
    VP_HOST_NS="vp-$tag-host-$$"
    VP_PEER_NS="vp-$tag-peer-$$"
    ip netns add "$VP_HOST_NS"; VP_NAMESPACES+=("$VP_HOST_NS")
    ip netns add "$VP_PEER_NS"; VP_NAMESPACES+=("$VP_PEER_NS")
    ip -n "$VP_HOST_NS" link add vh0 type veth peer name vp0 netns "$VP_PEER_NS"
    if [ -n "$mtu" ]; then
        ip -n "$VP_HOST_NS" link set vh0 mtu "$mtu"
        ip -n "$VP_PEER_NS" link set vp0 mtu "$mtu"
    fi
    ip -n "$VP_HOST_NS" link set lo up
    ip -n "$VP_HOST_NS" link set vh0 up
    ip -n "$VP_PEER_NS" link set lo up
    ip -n "$VP_PEER_NS" link set vp0 up
    ip -n "$VP_PEER_NS" addr add "$VP_PEER_IP/24" dev vp0
    ip -n "$VP_PEER_NS" -6 addr add "$VP_PEER_IP6/64" dev vp0 nodad
}

# vp_spawn NS LOG CMD...: starts CMD in namespace NS (or the current one if NS is "-"), output
# to LOG; records its PID in VP_PIDS and in VP_LAST_PID. Call it directly, not in $(...): a
# subshell's VP_PIDS would not reach vp_cleanup.
vp_spawn() {
    local ns="$1" log="$2"
    shift 2
    if [ "$ns" = "-" ]; then
        "$@" >"$log" 2>&1 </dev/null &
    else
        ip netns exec "$ns" "$@" >"$log" 2>&1 </dev/null &
    fi
    VP_LAST_PID=$!
    VP_PIDS+=("$VP_LAST_PID")
}

# vp_wait_for FILE TEXT SECONDS: waits until FILE contains TEXT.
vp_wait_for() {
    local file="$1" text="$2" secs="$3" i
    for i in $(seq $((secs * 10))); do
        grep -q -- "$text" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# vp_feature_names BITS: names of the virtio-net feature bits in a sysfs "features" string
# (character i is bit i).
vp_feature_names() {
    local bits="$1" i names=""
    local -A name=(
        [0]=CSUM [1]=GUEST_CSUM [2]=CTRL_GUEST_OFFLOADS [3]=MTU [5]=MAC [7]=GUEST_TSO4
        [8]=GUEST_TSO6 [9]=GUEST_ECN [10]=GUEST_UFO [11]=HOST_TSO4 [12]=HOST_TSO6
        [13]=HOST_ECN [14]=HOST_UFO [15]=MRG_RXBUF [16]=STATUS [17]=CTRL_VQ [18]=CTRL_RX
        [19]=CTRL_VLAN [21]=GUEST_ANNOUNCE [22]=MQ [28]=INDIRECT_DESC [29]=EVENT_IDX
        [23]=CTRL_MAC_ADDR [32]=VERSION_1 [33]=ACCESS_PLATFORM [54]=GUEST_USO4 [55]=GUEST_USO6 [56]=HOST_USO
    )
    for ((i = 0; i < ${#bits}; i++)); do
        [ "${bits:i:1}" = 1 ] || continue
        names+="${name[$i]:-bit$i} "
    done
    echo "${names% }"
}
