#!/usr/bin/env bash
# Boot the test guest (qemu/build-guest.sh) on a vhost-packet socket (or, to compare, a tap).
#
#   qemu/boot.sh --socket /run/vhost-packet.sock [options]
#   qemu/boot.sh --netdev tap [--tap IFNAME] [options]
#
# Options:
#   --socket PATH        vhost-packet's socket (QEMU connects and reconnects to it)
#                        [required with --netdev vhost-user]
#   --netdev vhost-user|tap  the NIC's backend: a vhost-user socket (--socket), or QEMU's own
#                        virtio-net on a tap device (-netdev tap,vhost=off, for comparisons;
#                        run QEMU in the tap's network namespace)      [vhost-user]
#   --tap IFNAME         the tap device for --netdev tap (QEMU creates it if missing)   [vp-tap0]
#   --mac MAC            the NIC's MAC                                   [52:54:00:12:34:56]
#   --addr CIDR          guest IPv4 address of eth0                       [198.18.0.1/24]
#   --addr6 CIDR         guest IPv6 address of eth0                       [2001:2::1/64]
#   --mtu N              host_mtu on the NIC and the guest's eth0 MTU
#   --queues N           queue pairs (-netdev queues=N, mq=on)            [1]
#   --queue-size N       rx_queue_size and tx_queue_size                   [256]
#   --nic OPTS           more virtio-net-pci options, e.g. mrg_rxbuf=off,guest_csum=off
#   --mem MB             guest memory (memfd, shared with the backend)     [512]
#   --reconnect SECONDS  chardev reconnect interval                        [1]
#   --accel auto|tcg|kvm KVM only when a probe boots a guest with it        [auto]
#   --serial-log FILE    serial console log            [qemu/.cache/serial-<pid>.log]
#   --console            serial console on stdin/stdout as well (tests drive the guest shell)
#   --run FILE           run FILE in the guest after eth0 is up, then power off
#
# The accelerator used is printed on stderr ("boot: accelerator tcg (...)"). The script execs
# QEMU, so its PID is QEMU's.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/.cache"
guest="${VP_GUEST_CACHE:-$cache/guest}"

socket="" mac="52:54:00:12:34:56" addr="198.18.0.1/24" addr6="2001:2::1/64" mtu=""
netdev_kind=vhost-user tap=vp-tap0
queues=1 qsize=256 nic="" mem=512 reconnect=1 accel=auto serial_log="" console=0 run=""
die() { echo "boot: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
    --socket) socket="$2"; shift ;;
    --netdev) netdev_kind="$2"; shift ;;
    --tap) tap="$2"; shift ;;
    --mac) mac="$2"; shift ;;
    --addr) addr="$2"; shift ;;
    --addr6) addr6="$2"; shift ;;
    --mtu) mtu="$2"; shift ;;
    --queues) queues="$2"; shift ;;
    --queue-size) qsize="$2"; shift ;;
    --nic) nic="$2"; shift ;;
    --mem) mem="$2"; shift ;;
    --reconnect) reconnect="$2"; shift ;;
    --accel) accel="$2"; shift ;;
    --serial-log) serial_log="$2"; shift ;;
    --console) console=1 ;;
    --run) run="$2"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
case "$netdev_kind" in
vhost-user) [ -n "$socket" ] || die "--socket PATH is required" ;;
tap) ;;
*) die "--netdev must be vhost-user or tap" ;;
esac
[ -s "$guest/vmlinux" ] && [ -s "$guest/initramfs.gz" ] || die "no guest image in $guest: run qemu/build-guest.sh"
command -v qemu-system-x86_64 >/dev/null || die "needs qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)"
mkdir -p "$cache"
serial_log="${serial_log:-$cache/serial-$$.log}"

# KVM: this host's /dev/kvm may be a PVM-based one that hangs on a stock guest kernel, so only
# a guest that actually boots with it counts. The probe's answer is cached per host kernel and
# guest kernel.
kvm_works() {
    [ -w /dev/kvm ] || { echo "no writable /dev/kvm"; return 1; }
    local key probe
    key="$(uname -r) $(cat "$guest/kernel-release")"
    probe="$cache/kvm-probe"
    if [ "$(head -1 "$probe" 2>/dev/null)" != "$key" ]; then
        local out
        out="$(timeout 20 qemu-system-x86_64 -accel kvm -M pc -m 128 -nodefaults -no-user-config \
            -display none -serial stdio -no-reboot -kernel "$guest/vmlinux" \
            -initrd "$guest/initramfs.gz" -append "console=ttyS0 loglevel=3 panic=-1 rdinit=/bin/true" \
            2>&1 || true)"
        if grep -q "Kernel panic\|Attempted to kill init" <<<"$out"; then
            printf '%s\nyes\n' "$key" >"$probe"
        else
            printf '%s\nno: a guest did not boot with -accel kvm within 20 s\n' "$key" >"$probe"
        fi
    fi
    local verdict
    verdict="$(sed -n 2p "$probe")"
    [ "$verdict" = yes ] && return 0
    echo "$verdict"
    return 1
}
case "$accel" in
auto)
    if why="$(kvm_works)"; then accel=kvm why="the KVM probe booted a guest"; else accel=tcg; fi ;;
kvm) why="requested" ;;
tcg) why="requested" ;;
*) die "--accel must be auto, tcg or kvm" ;;
esac
echo "boot: accelerator $accel ($why)" >&2

# Under TCG QEMU 7.2 crashes in vhost_net_start (MSI-X vector notifiers) unless the NIC has no
# MSI-X vectors; under KVM the NIC gets one per queue plus config and control. A tap netdev
# (no vhost) is not affected: it keeps QEMU's default, as its users have it.
if [ "$accel" = tcg ]; then vectors=0; else vectors=$((2 * queues + 2)); fi
device="virtio-net-pci,netdev=net0,mac=$mac,rx_queue_size=$qsize,tx_queue_size=$qsize"
if [ "$netdev_kind" = tap ]; then
    netdev="tap,id=net0,ifname=$tap,script=no,downscript=no,vhost=off"
    chardev=()
else
    device+=",vectors=$vectors"
    netdev="vhost-user,id=net0,chardev=vp0"
    chardev=(-chardev "socket,id=vp0,path=$socket,reconnect=$reconnect")
fi
if [ "$queues" -gt 1 ]; then
    device+=",mq=on"
    netdev+=",queues=$queues"
fi
[ -n "$mtu" ] && device+=",host_mtu=$mtu"
[ -n "$nic" ] && device+=",$nic"

append="console=ttyS0 loglevel=3 panic=-1 vp.addr=$addr vp.addr6=$addr6"
[ -n "$mtu" ] && append+=" vp.mtu=$mtu"

# --run: a second cpio appended to the initramfs carries /run.sh (the kernel unpacks both).
initrd="$guest/initramfs.gz"
if [ -n "$run" ]; then
    [ -r "$run" ] || die "cannot read $run"
    # Named by content (QEMU is exec'd, nothing runs after it to clean up), so reruns reuse it.
    initrd="$cache/initramfs-run-$(cat "$guest/initramfs.gz" "$run" | sha256sum | cut -c1-16).gz"
    if [ ! -s "$initrd" ]; then
        staging="$(mktemp -d "${TMPDIR:-/tmp}/vp-run.XXXXXX")"
        install -m 755 "$run" "$staging/run.sh"
        { cat "$guest/initramfs.gz"; (cd "$staging" && echo run.sh | cpio -o -H newc --quiet | gzip -1); } >"$initrd.tmp"
        rm -rf "$staging"
        mv "$initrd.tmp" "$initrd"
    fi
fi

if [ "$console" = 1 ]; then
    serial=(-chardev "stdio,id=ser0,signal=off,logfile=$serial_log" -serial chardev:ser0)
else
    serial=(-chardev "file,id=ser0,path=$serial_log" -serial chardev:ser0)
fi

exec qemu-system-x86_64 \
    -name vhost-packet-guest,debug-threads=on -accel "$accel" -M pc -m "$mem" -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot \
    -object "memory-backend-memfd,id=mem0,size=${mem}M,share=on" -numa node,memdev=mem0 \
    -kernel "$guest/vmlinux" -initrd "$initrd" -append "$append" \
    "${chardev[@]}" -netdev "$netdev" -device "$device" \
    "${serial[@]}"
