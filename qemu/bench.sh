#!/usr/bin/env bash
# The benchmark of issue 7: vhost-packet, DPDK testpmd as the vhost backend, QEMU's own
# virtio-net on a tap, and the veth alone, measured in one run and printed as one table.
#
#   sudo ./qemu/bench.sh [--quick] [--only PART,...] [--systems SYSTEM,...] [--vp-args "ARGS"]
#
# Booted guest (the test guest of qemu/build-guest.sh under QEMU, same image for every system):
# TCP both ways (iperf3, single stream, median of 3 runs of 10 s), retransmits, ping RTT (avg
# and p99 of 300 pings). Guest-less: 64-byte packet rates both ways with DPDK's virtio-user as
# generator and sink, request/response RTT (ICMP echo, one at a time, with and without
# --busy-poll-us) and 64 KiB GSO frames from tests/bench.rs. Every figure is also given as
# a ratio to DPDK's, and each backend's CPU time per GB it moved. --quick: one 3 s run of each
# (a smoke test). --only measures some parts: limit, guest, pps, rtt, bulk (the others print "-");
# --systems some of the backends: vp, dpdk, tap.
# --vp-args passes more options to vhost-packet (e.g. "--busy-poll-us 50"). docs/performance.md
# describes the method and the results.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

runs=3 secs=10 pps_secs=5 rtt_pings=20000 pings=300 only="limit,guest,pps,rtt,bulk" systems="vp,dpdk,tap" vp_args=""
while [ $# -gt 0 ]; do
    case "$1" in
    --quick) runs=1 secs=3 pps_secs=2 rtt_pings=2000 pings=100 ;;
    --only) only="${2:?--only needs a list of parts}"; shift ;;
    --systems) systems="${2:?--systems needs a list}"; shift ;;
    --vp-args) vp_args="${2?--vp-args needs a value}"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) vp_die "unknown option $1 (see --help)" ;;
    esac
    shift
done
ping_interval=0.02
mac="$VP_GUEST_MAC"
sink_mac="02:00:00:00:00:fe" # no one's: the peer's stack drops such frames at once
declare -A R=()              # results: R[system.figure]
declare -A PMD_FD=() PMD_PID=()
DPDK_PREFIXES=()
iperf_pid=""

vp_require_root
vp_need_packages qemu-system-x86 iperf3 ethtool iproute2 iputils-ping cpio xz-utils coreutils \
    dpdk dpdk-dev librte-net-virtio23 librte-net-vhost23 librte-net-af-packet23 librte-mempool-ring23
bench_cleanup() {
    local p
    vp_cleanup
    for p in "${DPDK_PREFIXES[@]}"; do rm -rf "/var/run/dpdk/$p"; done
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
started=$(date +%s)
vp_build
test_bin="$(cd "$VP_REPO" && cargo test --release --test bench --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)"
[ -x "$VP_REPO/$test_bin" ] || vp_die "cargo test --release --test bench --no-run failed"
VP_TMP="$(mktemp -d /tmp/vhost-packet-bench.XXXXXX)"
hz=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
# Helpers

# stop PID: SIGTERM, then SIGKILL after 5 s; forgets it (lib.sh's cleanup must not signal a
# PID that may have been reused).
stop() {
    local pid="$1" i keep=()
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${VP_PIDS[@]}"; do [ "$i" = "$pid" ] || keep+=("$i"); done
    VP_PIDS=("${keep[@]}")
}

# namespaces TAG: a fresh host/peer pair (lib.sh's vp_netns); drop_namespaces deletes it.
namespaces() { vp_netns "$1"; }
drop_namespaces() {
    [ -z "$iperf_pid" ] || stop "$iperf_pid"
    iperf_pid=""
    ip netns del "$VP_HOST_NS"
    ip netns del "$VP_PEER_NS"
}
in_host() { ip netns exec "$VP_HOST_NS" "$@"; }
in_peer() { ip netns exec "$VP_PEER_NS" "$@"; }
peer_counter() { in_peer cat "/sys/class/net/vp0/statistics/$1"; }
peer_bytes() { echo $(($(peer_counter rx_bytes) + $(peer_counter tx_bytes))); }

# DPDK's af_packet PMD has no virtio net header: checksum and segmentation offloads must be off
# on both veth ends, or TCP does not even connect.
offloads_off() {
    in_host ethtool -K vh0 tx off sg off tso off gso off gro off >/dev/null 2>&1
    in_peer ethtool -K vp0 tx off sg off tso off gso off gro off >/dev/null 2>&1
}

# cpu PID [THREAD-NAME]: CPU time (clock ticks) of a process, less its threads of that name.
cpu() {
    local ticks t
    ticks=$(sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}')
    if [ -n "${2:-}" ]; then
        grep -qx "$2" /proc/"$1"/task/*/comm || vp_say "warning: process $1 has no thread '$2'"
        for t in /proc/"$1"/task/*; do
            [ "$(cat "$t/comm")" = "$2" ] || continue
            ticks=$((ticks - $(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')))
        done
    fi
    echo "$ticks"
}
# cpu_per_gb TICKS BYTES; seconds_per_gb SECONDS BYTES
cpu_per_gb() { seconds_per_gb "$(awk -v t="$1" -v hz="$hz" 'BEGIN { print t / hz }')" "$2"; }
seconds_per_gb() { awk -v s="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", s / (b / 1e9) }'; }
# bench_field NAME KEY <<<OUTPUT: KEY's value on tests/bench.rs's "BENCH NAME ..." line.
bench_field() { sed -n "s/.*BENCH $1 .* $2=\([0-9.]*\).*/\1/p"; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }

start_iperf_server() {
    vp_spawn "$VP_PEER_NS" "$VP_TMP/iperf3-server.log" iperf3 -s
    iperf_pid=$VP_LAST_PID
    for _ in $(seq 50); do
        in_peer ss -Hltn 'sport = :5201' | grep -q . && return 0
        sleep 0.1
    done
    vp_die "iperf3 -s did not listen"
}

start_vhost_packet() {
    vp_spawn "$VP_HOST_NS" "$VP_TMP/vhost-packet.log" \
        "$VP_BIN" --socket "$VP_TMP/vp.sock" --interface vh0 --mac "$mac" $vp_args "$@"
    vhost_pid=$VP_LAST_PID
    vp_wait_for "$VP_TMP/vhost-packet.log" "listening on" 10 ||
        vp_die "vhost-packet did not start: $(cat "$VP_TMP/vhost-packet.log")"
}

# pmd_start NAME TESTPMD-ARGS...: dpdk-testpmd in the host namespace, its prompt on a FIFO
# (stdbuf -oL: its output would otherwise sit in a buffer).
pmd_start() {
    local name="$1" fd prefix="vp-bench-$$-$1"
    shift
    mkfifo "$VP_TMP/$name.in"
    : >"$VP_TMP/$name.log"
    DPDK_PREFIXES+=("$prefix")
    ip netns exec "$VP_HOST_NS" stdbuf -oL dpdk-testpmd --file-prefix "$prefix" "$@" \
        <"$VP_TMP/$name.in" >"$VP_TMP/$name.log" 2>&1 &
    PMD_PID[$name]=$!
    VP_PIDS+=("$!")
    exec {fd}>"$VP_TMP/$name.in"
    PMD_FD[$name]=$fd
    vp_wait_for "$VP_TMP/$name.log" "testpmd> " 60 ||
        vp_die "dpdk-testpmd did not start: $(tail -20 "$VP_TMP/$name.log")"
}
# pmd NAME COMMAND UNTIL: sends a command, waits for UNTIL in what it prints, prints that.
pmd() {
    local log="$VP_TMP/$1.log" size
    size=$(stat -c %s "$log")
    echo "$2" >&"${PMD_FD[$1]}"
    for _ in $(seq 300); do
        if tail -c +"$((size + 1))" "$log" | grep -q -- "$3"; then
            tail -c +"$((size + 1))" "$log"
            return 0
        fi
        sleep 0.05
    done
    vp_die "testpmd $1: no '$3' after '$2': $(tail -20 "$log")"
}
pmd_quit() {
    echo quit >&"${PMD_FD[$1]}" || true
    for _ in $(seq 50); do kill -0 "${PMD_PID[$1]}" 2>/dev/null || break; sleep 0.1; done
    local fd=${PMD_FD[$1]}
    exec {fd}>&-
    stop "${PMD_PID[$1]}"
    rm -f "$VP_TMP/$1.in"
}
pmd_rx() { pmd "$1" "show port stats 0" "Tx-pps:" | awk '/RX-packets:/ { print $2; exit }'; }

# dpdk_backend: testpmd as the vhost backend as its users run it: vhost PMD <-> af_packet PMD
# on vh0, io forwarding.
dpdk_backend() {
    offloads_off
    pmd_start backend -l 0-1 --no-huge -m 1024 --no-pci \
        --vdev "net_vhost0,iface=$VP_TMP/dpdk.sock,queues=1" --vdev net_af_packet0,iface=vh0 \
        -- -i --forward-mode=io --total-num-mbufs=32768
    pmd backend start "packet forwarding - ports=" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Booted guest

# guest SYSTEM BACKEND-PID THREAD-TO-EXCLUDE BOOT-ARGS...: boots the guest in the host
# namespace; it pings the peer, then runs iperf3 both ways; the backend's CPU time and the
# bytes through the veth are taken between the guest's start and end markers.
guest() {
    local sys="$1" pid="$2" exclude="$3" log="$VP_TMP/serial-$1.log" qemu cpu0="" b0="" q0 q1 c1 b1
    shift 3
    rm -f "$log"
    cat >"$VP_TMP/run-$sys.sh" <<EOF
#!/bin/sh
ping -c 2 -W 2 $VP_PEER_IP >/dev/null
ping -c $pings -i $ping_interval $VP_PEER_IP | sed -n 's/.*time=\([0-9.]*\) ms.*/BENCH-RTT \1/p'
echo BENCH-MARK start
sleep 1
i=0
while [ \$i -lt $runs ]; do
    iperf3 -c $VP_PEER_IP -t $secs -f m | sed -n 's/^/BENCH-UP /p'
    iperf3 -c $VP_PEER_IP -t $secs -f m -R | sed -n 's/^/BENCH-DOWN /p'
    i=\$((i + 1))
done
echo BENCH-MARK end
sleep 2
EOF
    vp_spawn "$VP_HOST_NS" "$VP_TMP/qemu-$sys.log" "$VP_REPO/qemu/boot.sh" \
        --mac "$mac" --run "$VP_TMP/run-$sys.sh" --serial-log "$log" \
        --addr "$VP_GUEST_IP/24" --addr6 "$VP_GUEST_IP6/64" "$@"
    qemu=$VP_LAST_PID
    pid=${pid:-$qemu}
    local deadline=$(($(date +%s) + 120 + runs * 2 * (secs + 10)))
    while kill -0 "$qemu" 2>/dev/null; do
        if [ -z "$cpu0" ] && grep -q '^BENCH-MARK start' "$log" 2>/dev/null; then
            cpu0=$(cpu "$pid" "$exclude") q0=$(cpu "$qemu" "CPU 0/TCG") b0=$(peer_bytes)
        fi
        if [ -z "$b0" ] || ! grep -q '^BENCH-MARK end' "$log"; then
            [ "$(date +%s)" -lt "$deadline" ] || vp_die "$sys: the guest did not finish; see $log"
            sleep 0.05
            continue
        fi
        c1=$(cpu "$pid" "$exclude") q1=$(cpu "$qemu" "CPU 0/TCG") b1=$(peer_bytes)
        R[$sys.cpu_tcp]=$(cpu_per_gb $((c1 - cpu0)) $((b1 - b0)))
        R[$sys.cpu_qemu]=$(cpu_per_gb $((q1 - q0)) $((b1 - b0)))
        break
    done
    for _ in $(seq 300); do kill -0 "$qemu" 2>/dev/null || break; sleep 0.1; done
    stop "$qemu"
    grep -q '^BENCH-MARK end' "$log" || vp_die "$sys: the guest's run failed: $(tail -30 "$log")"
    ACCEL[$sys]="$(sed -n 's/^boot: accelerator \([a-z]*\).*/\1/p' "$VP_TMP/qemu-$sys.log")"
    parse_iperf "$sys" BENCH-UP up <"$log"
    parse_iperf "$sys" BENCH-DOWN down <"$log"
    parse_ping "$sys" < <(sed -n 's/^BENCH-RTT \([0-9.]*\).*/\1/p' "$log")
}
declare -A ACCEL=()

# parse_iperf SYSTEM PREFIX DIRECTION < iperf3 output: median Gbit/s (receiver) and retransmits
# (sender) of the runs.
parse_iperf() {
    local text
    text="$(tr -d '\r' | awk -v p="$2" '$1 == p')"
    # "... 1995 MBytes  1673 Mbits/sec  12  sender": the Retr column follows the rate.
    R[$1.$3]=$(awk '$NF == "receiver" { for (i = 2; i <= NF; i++)
        if ($i == "Mbits/sec") print $(i - 1) / 1000 }' <<<"$text" | median)
    R[$1.retr_$3]=$(awk '$NF == "sender" { for (i = 2; i <= NF; i++)
        if ($i == "Mbits/sec") print $(i + 1) }' <<<"$text" | median)
}
# parse_ping SYSTEM < one RTT (ms) per line: average and p99 (nearest rank).
parse_ping() {
    local rtts
    rtts="$(sort -g)"
    R[$1.rtt_avg]=$(awk '{ s += $1 } END { if (NR) printf "%.3f", s / NR }' <<<"$rtts")
    R[$1.rtt_p99]=$(awk '{ v[NR] = $1 } END {
        r = int(NR * 0.99); if (r < NR * 0.99) r++; if (NR) print v[r] }' <<<"$rtts")
}

guest_vhost_packet() {
    namespaces g-vp
    start_iperf_server
    start_vhost_packet
    guest vp "$vhost_pid" "" --socket "$VP_TMP/vp.sock"
    stop "$vhost_pid"
    drop_namespaces
}

guest_dpdk() {
    namespaces g-dpdk
    start_iperf_server
    dpdk_backend
    guest dpdk "${PMD_PID[backend]}" "" --socket "$VP_TMP/dpdk.sock"
    pmd_quit backend
    drop_namespaces
}

# QEMU opens /dev/net/tun in its own namespace: it runs in the host namespace, where a bridge
# joins its tap and vh0. The backend is QEMU's I/O thread: QEMU less its TCG vCPU thread.
guest_tap() {
    namespaces g-tap
    start_iperf_server
    ip -n "$VP_HOST_NS" -batch - <<EOF
link add br0 type bridge
tuntap add dev vp-tap0 mode tap
link set vp-tap0 master br0 up
link set vh0 master br0
link set br0 up
EOF
    guest tap "" "CPU 0/TCG" --netdev tap --tap vp-tap0
    drop_namespaces
}

# The limit: the same iperf3 and ping straight between the two namespaces over the veth.
limit() {
    local i out=""
    namespaces limit
    in_host ip addr add "$VP_GUEST_IP/24" dev vh0
    start_iperf_server
    in_host ping -c 2 -W 2 "$VP_PEER_IP" >/dev/null
    parse_ping limit < <(in_host ping -c "$pings" -i "$ping_interval" "$VP_PEER_IP" |
        sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p')
    for i in $(seq "$runs"); do
        out+="$(in_host iperf3 -c "$VP_PEER_IP" -t "$secs" -f m | sed 's/^/UP /')"$'\n' ||
            vp_die "iperf3 over the veth failed"
        out+="$(in_host iperf3 -c "$VP_PEER_IP" -t "$secs" -f m -R | sed 's/^/DOWN /')"$'\n' ||
            vp_die "iperf3 -R over the veth failed"
    done
    parse_iperf limit UP up <<<"$out"
    parse_iperf limit DOWN down <<<"$out"
    drop_namespaces
}

# ---------------------------------------------------------------------------------------------
# Guest-less: DPDK's virtio-user (testpmd) as the frontend

# pps SYSTEM SOCKET BACKEND-PID: 64-byte packets per second, frontend -> peer (testpmd txonly,
# counted at the peer veth) and peer -> frontend (tests/bench.rs inject_64 in the peer
# namespace, counted by testpmd rxonly). The frontend's testpmd forwards on lcore 0 (a
# vhost backend testpmd forwards on lcore 1).
# sample_rate SYSTEM tx|rx BACKEND-PID COUNTER-COMMAND...: packets per second over pps_secs
# (the command prints a packet count) and the backend's CPU per GB at 64 bytes a packet.
sample_rate() {
    local sys="$1" dir="$2" pid="$3" t0 n c
    shift 3
    t0=$(now) n=$("$@") c=$(cpu "$pid")
    sleep "$pps_secs"
    n=$(($("$@") - n)) c=$(($(cpu "$pid") - c))
    R[$sys.pps_$dir]=$(awk -v n="$n" -v t="$(elapsed "$t0")" 'BEGIN { printf "%.3f", n / t / 1e6 }')
    R[$sys.cpu_pps_$dir]=$(cpu_per_gb "$c" $((n * 64)))
}

pps() {
    local sys="$1" sock="$2" pid="$3" gen
    pmd_start front -l 0-1 --main-lcore 1 --no-huge -m 512 --no-pci \
        --vdev "net_virtio_user0,path=$sock,queues=1,mac=$mac" \
        -- -i --forward-mode=txonly "--eth-peer=0,$sink_mac" --total-num-mbufs=16384
    pmd front start "packet forwarding - ports=" >/dev/null
    sleep 1
    sample_rate "$sys" tx "$pid" peer_counter rx_packets
    pmd front stop "Done." >/dev/null
    pmd front "set fwd rxonly" "Set rxonly" >/dev/null
    pmd front start "packet forwarding - ports=" >/dev/null
    vp_spawn "$VP_PEER_NS" "$VP_TMP/inject-$sys.log" env BENCH_INJECT_IF=vp0 \
        BENCH_INJECT_DST="$mac" BENCH_SECONDS=$((pps_secs + 2)) \
        "$VP_REPO/$test_bin" --ignored --exact inject_64 --nocapture --test-threads 1
    gen=$VP_LAST_PID
    sleep 1
    sample_rate "$sys" rx "$pid" pmd_rx front
    for _ in $(seq 100); do kill -0 "$gen" 2>/dev/null || break; sleep 0.1; done
    stop "$gen"
    R[$sys.inject]=$(sed -n 's/.*BENCH inject .* pps=\([0-9]*\).*/\1/p' "$VP_TMP/inject-$sys.log")
    pmd_quit front
}

pps_vhost_packet() {
    namespaces p-vp
    start_vhost_packet
    pps vp "$VP_TMP/vp.sock" "$vhost_pid"
    stop "$vhost_pid"
    drop_namespaces
}

pps_dpdk() {
    namespaces p-dpdk
    dpdk_backend
    pps dpdk "$VP_TMP/dpdk.sock" "${PMD_PID[backend]}"
    pmd_quit backend
    drop_namespaces
}

# bulk: 64 KiB GSO frames from tests/bench.rs's TestFrontend through vhost-packet, and the
# same frames from a packet socket alone.
bulk() {
    local out
    namespaces bulk
    start_vhost_packet
    out="$(cd "$VP_REPO" && BENCH_SOCKET="$VP_TMP/vp.sock" BENCH_HOST_NS="$VP_HOST_NS" \
        BENCH_PEER_NS="$VP_PEER_NS" BENCH_BACKEND_PID="$vhost_pid" BENCH_SECONDS="$secs" \
        "$VP_REPO/$test_bin" --ignored --exact bulk_gso_64k --nocapture 2>&1)" ||
        vp_die "tests/bench.rs bulk_gso_64k failed: $out"
    stop "$vhost_pid"
    drop_namespaces
    field() { bench_field "$1" "$2" <<<"$out"; }
    R[vp.bulk]=$(field bulk_gso gbit)
    R[vp.cpu_bulk]=$(seconds_per_gb "$(field bulk_gso cpu_s)" "$(field bulk_gso bytes)")
    R[limit.bulk_direct]=$(field bulk_direct gbit)
    R[limit.cpu_bulk_direct]=$(seconds_per_gb "$(field bulk_direct cpu_s)" "$(field bulk_direct bytes)")
    [ "$(field bulk_gso arrived)" -ge "$(field bulk_gso completed)" ] ||
        vp_say "warning: bulk: frames lost on the way: $(grep -o 'BENCH bulk_gso.*' <<<"$out")"
}

# rtt: request/response latency without a guest (tests/bench.rs rtt_icmp: the TestFrontend
# pings the peer's kernel, one echo at a time), vhost-packet as configured and with
# --busy-poll-us 50.
rtt() {
    local out key args field
    namespaces rtt
    for key in icmp icmp_busy; do
        args=()
        [ "$key" = icmp_busy ] && args=(--busy-poll-us 50)
        start_vhost_packet "${args[@]}"
        rtt_icmp vp "$key" "$VP_TMP/vp.sock" "$vhost_pid"
        stop "$vhost_pid"
    done
    drop_namespaces
}

rtt_dpdk() {
    namespaces rtt-dpdk
    dpdk_backend
    rtt_icmp dpdk icmp "$VP_TMP/dpdk.sock" "${PMD_PID[backend]}"
    pmd_quit backend
    drop_namespaces
}

# rtt_icmp SYSTEM KEY SOCKET BACKEND-PID
rtt_icmp() {
    local out field
    out="$(cd "$VP_REPO" && BENCH_SOCKET="$3" BENCH_HOST_NS="$VP_HOST_NS" \
        BENCH_PEER_NS="$VP_PEER_NS" BENCH_BACKEND_PID="$4" BENCH_PINGS=$((rtt_pings)) \
        "$VP_REPO/$test_bin" --ignored --exact rtt_icmp --nocapture 2>&1)" ||
        vp_die "tests/bench.rs rtt_icmp against $1 failed: $out"
    field() { bench_field rtt_icmp "$1" <<<"$out"; }
    R[$1.${2}_avg]=$(field avg_us)
    R[$1.${2}_p99]=$(field p99_us)
    R[$1.${2}_cpu]=$(awk -v c="$(field backend_cpu_s)" -v s="$(field seconds)" \
        'BEGIN { if (s > 0) printf "%.2f", c / s }')
}

# ---------------------------------------------------------------------------------------------
# Run and print

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
part() { [[ ",$only," == *",$1,"* ]]; }
system() { [[ ",$systems," == *",$1,"* ]]; }
for p in ${only//,/ }; do
    case "$p" in limit | guest | pps | rtt | bulk) ;; *) vp_die "--only: unknown part $p" ;; esac
done
for p in ${systems//,/ }; do
    case "$p" in vp | dpdk | tap) ;; *) vp_die "--systems: unknown system $p" ;; esac
done
if part limit; then vp_say "veth limit"; limit; fi
if part guest; then
    if system vp; then vp_say "booted guest: vhost-packet"; guest_vhost_packet; fi
    if system dpdk; then vp_say "booted guest: DPDK testpmd"; guest_dpdk; fi
    if system tap; then vp_say "booted guest: QEMU tap"; guest_tap; fi
fi
if part pps; then
    if system vp; then vp_say "64-byte packets: vhost-packet"; pps_vhost_packet; fi
    if system dpdk; then vp_say "64-byte packets: DPDK testpmd"; pps_dpdk; fi
fi
if part rtt; then
    if system vp; then vp_say "request/response RTT: vhost-packet"; rtt; fi
    if system dpdk; then vp_say "request/response RTT: DPDK testpmd"; rtt_dpdk; fi
fi
if part bulk && system vp; then vp_say "64 KiB GSO bulk: vhost-packet"; bulk; fi
R[limit.bulk]=${R[limit.up]:-}
# DPDK always polls: its RTT is the reference for the busy-polling rows too.
R[dpdk.icmp_busy_avg]=${R[dpdk.icmp_avg]:-}
R[dpdk.icmp_busy_p99]=${R[dpdk.icmp_p99]:-}
R[dpdk.icmp_busy_cpu]=${R[dpdk.icmp_cpu]:-}

# cell SYSTEM FIGURE [REFERENCE-SYSTEM]: the figure and its ratio to the reference's.
cell() {
    local v="${R[$1.$2]:-}" ref="${R[${3:-dpdk}.$2]:-}"
    [ -n "$v" ] || { echo "-"; return; }
    awk -v v="$v" -v r="$ref" -v own="$([ "$1" = "${3:-dpdk}" ] && echo 1)" 'BEGIN {
        if (own || r == "" || r + 0 == 0) { print v; exit }
        printf "%s (%.2fx)\n", v, v / r }'
}
row() { # LABEL FIGURE [REFERENCE-SYSTEM]
    printf '%-31s' "$1"
    for s in vp dpdk tap limit; do printf ' %-17s' "$(cell "$s" "$2" "${3:-}")"; done
    echo
}
ratio() { awk -v a="${R[$1]:-0}" -v b="${R[$2]:-0}" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
verdict() { awk -v r="$2" -v t="$3" -v lower="${4:-}" -v what="$1" 'BEGIN {
    if (r + 0 == 0) { printf "  %-40s   -    (not measured)\n", what; exit }
    ok = lower ? r <= t : r >= t
    printf "  %-40s %5.2fx  (target %s %sx) %s\n", what, r, lower ? "<=" : ">=", t,
        ok ? "met" : "NOT met" }'; }

wall=$(($(date +%s) - started))
mode="median of $runs runs of $secs s"
[ "$runs" = 1 ] && mode="--quick: 1 run of $secs s"
cpu_model="$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
accels="$(printf '%s\n' "${ACCEL[@]}" | sort -u | tr '\n' ' ')"
qemu_version="$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')"
dpdk_version="$(pkg-config --modversion libdpdk 2>/dev/null || dpkg-query -W -f='${Version}' dpdk)"
iperf_version="$(iperf3 --version | head -1 | awk '{print $2}')"
guest_kernel="$(cat "$VP_REPO/qemu/.cache/guest/kernel-release")"
vp_version="$(git -C "$VP_REPO" describe --always --dirty 2>/dev/null || echo "?")"
sed 's/ *$//' <<EOF

vhost-packet benchmark ($mode, $(date -u +%Y-%m-%dT%H:%MZ), ${wall} s)
  host       $(nproc) cores ($cpu_model), Linux $(uname -r)
  load       average ${load_before} before, $(cut -d' ' -f1-3 /proc/loadavg) after
  guest      accelerator ${accels% } (qemu/boot.sh), kernel $guest_kernel, 1 vCPU, 512 MB, queues of 256
  versions   QEMU $qemu_version, DPDK $dpdk_version, iperf3 $iperf_version, vhost-packet $vp_version${vp_args:+ (options: $vp_args)}
  ratios     to the DPDK column; for the 64 KiB GSO rows to the veth limit's TCP figure

$(printf '%-31s %-17s %-17s %-17s %-17s' "" "vhost-packet" "DPDK testpmd" "QEMU tap" "veth limit")
booted guest (TCG), iperf3 and ping
$(row "  TCP guest->peer Gbit/s" up)
$(row "  TCP peer->guest Gbit/s" down)
$(row "  retransmits guest->peer" retr_up)
$(row "  retransmits peer->guest" retr_down)
$(row "  ping RTT avg ms" rtt_avg)
$(row "  ping RTT p99 ms" rtt_p99)
$(row "  backend CPU s/GB" cpu_tcp)
$(row "  QEMU less vCPU, CPU s/GB" cpu_qemu)
guest-less, DPDK virtio-user frontend
$(row "  64 B frontend->peer Mpps" pps_tx)
$(row "    backend CPU s/GB" cpu_pps_tx)
$(row "  64 B peer->frontend Mpps" pps_rx)
$(row "    backend CPU s/GB" cpu_pps_rx)
guest-less, tests/bench.rs TestFrontend
$(row "  ICMP echo RTT avg us" icmp_avg)
$(row "  ICMP echo RTT p99 us" icmp_p99)
$(row "    backend CPU, cores" icmp_cpu)
$(row "  --busy-poll-us 50: avg us" icmp_busy_avg)
$(row "  --busy-poll-us 50: p99 us" icmp_busy_p99)
$(row "    backend CPU, cores" icmp_busy_cpu)
$(row "  64 KiB GSO Gbit/s" bulk limit)
$(row "    backend CPU s/GB" cpu_bulk)
$(row "  same, from a packet socket" bulk_direct limit)
$(row "    sender CPU s/GB" cpu_bulk_direct)

issue 7 targets
$(verdict "TCP guest->peer vs DPDK" "$(ratio vp.up dpdk.up)" 3)
$(verdict "TCP peer->guest vs DPDK" "$(ratio vp.down dpdk.down)" 3)
$(verdict "TCP guest->peer vs QEMU tap" "$(ratio vp.up tap.up)" 2)
$(verdict "TCP peer->guest vs QEMU tap" "$(ratio vp.down tap.down)" 2)
$(verdict "64 B frontend->peer vs DPDK" "$(ratio vp.pps_tx dpdk.pps_tx)" 1.2)
$(verdict "64 B peer->frontend vs DPDK" "$(ratio vp.pps_rx dpdk.pps_rx)" 1.2)
$(verdict "ping RTT avg vs DPDK" "$(ratio vp.rtt_avg dpdk.rtt_avg)" 1 lower)
$(verdict "64 KiB GSO bulk vs veth limit" "$(ratio vp.bulk limit.up)" 0.5)
$(verdict "guest-less ICMP RTT avg vs DPDK" "$(ratio vp.icmp_avg dpdk.icmp_avg)" 1 lower)
$(verdict "  the same with --busy-poll-us 50" "$(ratio vp.icmp_busy_avg dpdk.icmp_avg)" 1 lower)
  (64 KiB GSO bulk is $(ratio vp.bulk limit.bulk_direct)x the same frames sent from a packet socket)
  (the 64 B peer->frontend generator offered ${R[vp.inject]:-?} pps with vhost-packet,
   ${R[dpdk.inject]:-?} with DPDK)
EOF
