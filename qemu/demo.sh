#!/usr/bin/env bash
# vhost-packet in one command: a guest on a veth through vhost-packet, measured, then removed.
#
#   sudo ./qemu/demo.sh [--seconds N] [--nic VIRTIO_NET_OPTS] [--queues N] [--streams N]
#
# --queues N: N queue pairs (vhost-packet --queues, QEMU mq=on, ethtool -L in the guest);
# --streams N: parallel TCP streams (iperf3 -P).
#
# Builds vhost-packet and the test guest (qemu/build-guest.sh), creates a "host" namespace
# (vhost-packet bound to vh0) and a "peer" namespace (vp0, 198.18.0.2, iperf3 server) joined by
# a veth pair, boots the guest (198.18.0.1) with QEMU on vhost-packet's socket, and prints the
# features the guest negotiated, ping RTT and TCP throughput both ways. Everything it started
# is stopped and its namespaces deleted on exit, also on failure or Ctrl-C.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

seconds=5 nic="" queues=1 streams=1
while [ $# -gt 0 ]; do
    case "$1" in
    --seconds) seconds="$2"; shift ;;
    --nic) nic="$2"; shift ;;
    --queues) queues="$2"; shift ;;
    --streams) streams="$2"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) vp_die "unknown option $1 (see --help)" ;;
    esac
    shift
done

vp_require_root
vp_need_packages qemu-system-x86 iperf3 ethtool iproute2 iputils-ping cpio xz-utils
trap vp_cleanup EXIT
trap 'exit 130' INT TERM
vp_build

VP_TMP="$(mktemp -d /tmp/vhost-packet-demo.XXXXXX)"
vp_netns demo
socket="$VP_TMP/vhost-packet.sock"
vp_spawn "$VP_PEER_NS" "$VP_TMP/iperf3.log" iperf3 -s
vp_spawn "$VP_HOST_NS" "$VP_TMP/vhost-packet.log" \
    "$VP_BIN" --socket "$socket" --interface vh0 --mac "$VP_GUEST_MAC" --queues "$queues"
vp_wait_for "$VP_TMP/vhost-packet.log" "listening on" 10 ||
    vp_die "vhost-packet did not start: $(cat "$VP_TMP/vhost-packet.log")"

# What the guest runs once eth0 is up (markers for the table below).
cat >"$VP_TMP/run.sh" <<EOF
#!/bin/sh
[ $queues -gt 1 ] && ethtool -L eth0 combined $queues
echo "DEMO-PING \$(ping -c 10 -i 0.2 $VP_PEER_IP | tail -1)"
iperf3 -c $VP_PEER_IP -t $seconds -P $streams -f m | sed -n 's/^/DEMO-UP /p'
iperf3 -c $VP_PEER_IP -t $seconds -P $streams -f m -R | sed -n 's/^/DEMO-DOWN /p'
EOF

vp_say "booting the guest (serial log: $VP_TMP/serial.log)"
boot_args=(--socket "$socket" --mac "$VP_GUEST_MAC" --run "$VP_TMP/run.sh"
    --serial-log "$VP_TMP/serial.log" --addr "$VP_GUEST_IP/24" --addr6 "$VP_GUEST_IP6/64")
[ -n "$nic" ] && boot_args+=(--nic "$nic")
boot_args+=(--queues "$queues")
start=$(date +%s.%N)
vp_spawn - "$VP_TMP/qemu.log" "$VP_REPO/qemu/boot.sh" "${boot_args[@]}"
qemu_pid=$VP_LAST_PID
# The guest powers off when its script is done; give TCG plenty of time.
for _ in $(seq 1800); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$qemu_pid" 2>/dev/null && vp_die "the guest did not finish in 180 s; see $VP_TMP/serial.log"
wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')

log="$VP_TMP/serial.log"
field() { sed -n "s/^$1 //p" "$log" | tr -d '\r' | head -1; }
grep -q "^VP-RUN-EXIT 0" "$log" || { cat "$log" >&2; vp_die "the guest's script failed (log above)"; }
accel="$(sed -n 's/^boot: accelerator //p' "$VP_TMP/qemu.log")"
rate() { grep "^DEMO-$1 .*receiver" "$log" | tail -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") printf "%.2f", $(i - 1) / 1000}'; }
retr() { grep "^DEMO-$1 .*sender" "$log" | tail -1 | awk '{for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i + 1)}'; }
ping_line="$(field DEMO-PING)"
# One line from `vhost-packet stats` (its table has a row per counter).
counters="$("$VP_BIN" stats --socket "$socket" 2>/dev/null | awk '
    / drops disabled / { disabled += $NF }
    / drops / { drops += $NF; next }
    { v[$1 " " $2] = $NF }
    END { printf "RX %d packets (%d GSO, %d over several buffers), TX %d packets (%d GSO), %d drops (%d while the guest had not enabled its rings yet)",
          v["rx packets"], v["rx gso"], v["rx multi_buffer"], v["tx packets"], v["tx gso"], drops, disabled }' || true)"

cat <<EOF

vhost-packet demo
  QEMU                  $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), accelerator $accel
  guest kernel          $(cat "$VP_REPO/qemu/.cache/guest/kernel-release")
  eth0 up after boot    $(field VP-LINK) s (guest uptime; boot, tests and power-off ${wall} s)
  features negotiated   $(vp_feature_names "$(field VP-FEATURES)")
  ping RTT (10 pings)   ${ping_line#round-trip }
  queue pairs           $queues, $streams TCP stream(s) each way
  TCP guest -> peer     $(rate UP) Gbit/s, $(retr UP) retransmits ($seconds s, iperf3)
  TCP peer -> guest     $(rate DOWN) Gbit/s, $(retr DOWN) retransmits ($seconds s, iperf3)
  vhost-packet counters $counters
EOF
