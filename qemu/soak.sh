#!/usr/bin/env bash
# Soak: a booted guest runs bidirectional TCP for a long time while vhost-packet is killed
# (SIGKILL) and restarted every few minutes and the guest's link is flapped.
#
#   sudo ./qemu/soak.sh [--seconds 600] [--restart-every 120] [--flap-every 4]
#
# --flap-every N: the guest takes eth0 down and up after every N iperf3 rounds (5 s each).
# Every 5 s the daemon's anonymous RSS, open fds and threads are sampled. It fails (exit 1) if
# traffic does not resume within 30 s of a restart, if a daemon's fd or thread count grows
# while it serves the guest, if its anonymous RSS grows by more than 10% + 1 MiB over its life,
# if the guest reboots, or if fewer than half of the guest's iperf3 rounds succeed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

seconds=600 restart_every=120 flap_every=4
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds="$2"; shift ;;
    --restart-every) restart_every="$2"; shift ;;
    --flap-every) flap_every="$2"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) vp_die "unknown option $1 (see --help)" ;;
    esac
    shift
done

vp_require_root
vp_need_packages qemu-system-x86 iperf3 iproute2 iputils-ping cpio xz-utils
trap vp_cleanup EXIT
trap 'exit 130' INT TERM
vp_build

VP_TMP="$(mktemp -d /tmp/vhost-packet-soak.XXXXXX)"
vp_netns soak
socket="$VP_TMP/vhost-packet.sock"
vp_spawn "$VP_PEER_NS" "$VP_TMP/iperf3.log" iperf3 -s --rcv-timeout 5000

daemon_pid=""
lives=0
start_daemon() {
    lives=$((lives + 1))
    daemon_log="$VP_TMP/vhost-packet.$lives.log"
    vp_spawn "$VP_HOST_NS" "$daemon_log" "$VP_BIN" --socket "$socket" --interface vh0 \
        --mac "$VP_GUEST_MAC"
    daemon_pid=$VP_LAST_PID
    vp_wait_for "$daemon_log" "listening on" 10 || vp_die "vhost-packet did not start: $(cat "$daemon_log")"
}

# counter NAME: e.g. "rx packets" from `vhost-packet stats` (last column: all pairs).
counter() { "$VP_BIN" stats --socket "$socket" 2>/dev/null | awk -v k="$1" '$1 " " $2 == k {print $NF}'; }

# sample: "RSS_ANON_KB FDS THREADS" of the running daemon. Anonymous memory only: VmRSS also
# counts the guest memory the daemon has touched (shared memfd pages), which grows with the
# guest's working set of buffers and is not the daemon's own.
sample() {
    local rss threads fds
    rss=$(awk '/^RssAnon:/ {print $2}' "/proc/$daemon_pid/status" 2>/dev/null || echo 0)
    threads=$(awk '/^Threads:/ {print $2}' "/proc/$daemon_pid/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$daemon_pid/fd" 2>/dev/null | wc -l)
    echo "$rss $fds $threads"
}

# wait_traffic: until the running daemon has moved packets both ways; prints how long it took.
wait_traffic() {
    local t0 rx tx
    t0=$(date +%s.%N)
    for _ in $(seq 300); do
        rx=$(counter "rx packets"); tx=$(counter "tx packets")
        if [ "${rx:-0}" -gt 100 ] && [ "${tx:-0}" -gt 100 ]; then
            awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }'
            return 0
        fi
        sleep 0.1
    done
    echo never
}

cat >"$VP_TMP/run.sh" <<EOF
#!/bin/sh
end=\$((\$(cut -d. -f1 /proc/uptime) + $seconds))
round=0
while [ "\$(cut -d. -f1 /proc/uptime)" -lt "\$end" ]; do
    round=\$((round + 1))
    if iperf3 -c $VP_PEER_IP -t 5 --bidir -f m --connect-timeout 3000 >/tmp/round.log 2>&1; then
        echo "SOAK-ROUND \$round ok"
    else
        echo "SOAK-ROUND \$round failed: \$(tail -1 /tmp/round.log)"
        sleep 1
    fi
    if [ \$((round % $flap_every)) -eq 0 ]; then
        ip link set eth0 down; sleep 1; ip link set eth0 up
        echo "SOAK-FLAP \$round"
    fi
done
EOF

start_daemon
vp_say "soak for $seconds s: restart every $restart_every s, link flap every $flap_every rounds (log: $VP_TMP)"
vp_spawn - "$VP_TMP/qemu.log" "$VP_REPO/qemu/boot.sh" --socket "$socket" \
    --mac "$VP_GUEST_MAC" --run "$VP_TMP/run.sh" --serial-log "$VP_TMP/serial.log"
qemu_pid=$VP_LAST_PID

failures=0
fail() { vp_say "FAIL: $*"; failures=$((failures + 1)); }

# One daemon life: wait for traffic, sample while it serves the guest, then (unless the guest
# is done) SIGKILL it and start the next one on the same socket.
printf '%-5s %-8s %-24s %-10s %-12s %s\n' life seconds "anon RSS KiB first/max/last" \
    "fds f/l" "threads f/l" "traffic after start"
started=$(date +%s)
while kill -0 "$qemu_pid" 2>/dev/null; do
    life_start=$(date +%s)
    resumed=$(wait_traffic)
    [ "$resumed" = never ] && fail "life $lives: no traffic within 30 s of its start"
    first="" max_rss=0 last="" samples=0
    while kill -0 "$qemu_pid" 2>/dev/null && [ $(($(date +%s) - life_start)) -lt "$restart_every" ]; do
        grep -q "frontend disconnected" "$daemon_log" && break
        s=$(sample)
        [ -z "$first" ] && first="$s"
        last="$s"
        samples=$((samples + 1))
        read -r rss _ _ <<<"$s"
        [ "$rss" -gt "$max_rss" ] && max_rss=$rss
        sleep 5
    done
    if [ "$samples" -ge 2 ]; then
        read -r rss0 fds0 thr0 <<<"$first"
        read -r rss1 fds1 thr1 <<<"$last"
        printf '%-5s %-8s %-24s %-10s %-12s %s\n' "$lives" "$(($(date +%s) - life_start))" \
            "$rss0/$max_rss/$rss1" "$fds0/$fds1" "$thr0/$thr1" "$resumed"
        [ "$fds1" -gt "$fds0" ] && fail "life $lives: fds grew from $fds0 to $fds1"
        [ "$thr1" -gt "$thr0" ] && fail "life $lives: threads grew from $thr0 to $thr1"
        [ "$rss1" -gt $((rss0 + rss0 / 10 + 1024)) ] && fail "life $lives: RSS grew from $rss0 to $rss1 KiB"
    fi
    kill -0 "$qemu_pid" 2>/dev/null || break
    kill -KILL "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null || true
    start_daemon
done

log="$VP_TMP/serial.log"
ok=$(grep -c "^SOAK-ROUND .* ok" "$log" || true)
bad=$(grep -c "^SOAK-ROUND .* failed" "$log" || true)
flaps=$(grep -c "^SOAK-FLAP" "$log" || true)
boots=$(grep -c "^VP-INIT" "$log" || true)
echo "guest: $ok iperf3 rounds ok, $bad interrupted (restarts fall inside some), $flaps link flaps, $((lives - 1)) backend restarts, $boots boot(s), $(($(date +%s) - started)) s"
[ "$boots" -eq 1 ] || fail "the guest booted $boots times"
[ "$ok" -gt 0 ] && [ "$ok" -ge "$bad" ] || fail "too few iperf3 rounds succeeded ($ok ok, $bad interrupted)"
grep -q "^VP-RUN-EXIT" "$log" || fail "the guest did not finish its script"
if [ "$failures" -gt 0 ]; then
    vp_say "$failures failure(s); logs in $VP_TMP"
    VP_TMP=""  # keep the logs
    exit 1
fi
vp_say "passed"
