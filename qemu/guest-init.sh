#!/bin/busybox sh
# /init of the test guest (built into the initramfs by qemu/build-guest.sh).
#
# Kernel command line (set by qemu/boot.sh):
#   vp.addr=CIDR     IPv4 address of eth0 (e.g. 198.18.0.1/24)
#   vp.addr6=CIDR    IPv6 address of eth0 (e.g. 2001:2::1/64)
#   vp.mtu=N         MTU of eth0
# Markers on the serial console, one per line, for scripts and tests to wait on:
#   VP-INIT <uptime>          /init started
#   VP-FEATURES <bits>        the virtio-net feature bits the driver acked (bit 0 first)
#   VP-LINK <uptime>          eth0 configured and up
#   VP-SHELL                  ready for commands on the console (when there is no /run.sh)
#   VP-RUN-EXIT <status>      /run.sh (appended by qemu/boot.sh --run) finished; powering off
# Console commands may call `load MODULE` and `eth0_up` (defined below).
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# busybox sh runs its own applets before anything on PATH; the guest needs iproute2's ip
# (VLANs, IPv6 nodad) and iputils' ping (-M do), so every shell here starts with these.
echo 'ip() { /usr/sbin/ip "$@"; }; ping() { /usr/bin/ping "$@"; }' >/etc/vp-env.sh
. /etc/vp-env.sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "VP-INIT $(cut -d' ' -f1 /proc/uptime)"

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^vp\.$1=//p" | tail -1; }

# load MODULE: insmod it after its dependencies (lists made by qemu/build-guest.sh).
load() {
    for f in $(cat "/lib/modules/order/$1"); do
        grep -q "^$(basename "$f" .ko | tr - _) " /proc/modules || insmod "$f"
    done
}
# eth0_up: wait for eth0 (the driver probes it asynchronously), then configure it from the
# command line. Run here once, and again from the console after `rmmod virtio_net;
# load virtio_net`.
eth0_up() {
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    [ -e /sys/class/net/eth0 ] || return 1
    if [ -n "$(arg mtu)" ]; then ip link set eth0 mtu "$(arg mtu)" || return 1; fi
    ip link set eth0 up || return 1
    if [ -n "$(arg addr)" ]; then ip addr add "$(arg addr)" dev eth0 || return 1; fi
    if [ -n "$(arg addr6)" ]; then ip -6 addr add "$(arg addr6)" dev eth0 nodad || return 1; fi
}
load virtio_pci
load virtio_net
if ! eth0_up; then
    echo "VP-ERROR no eth0"
    poweroff -f
fi
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device")" = "0x0001" ] && echo "VP-FEATURES $(cat "$d/features")"
done
ip link set lo up
echo "VP-LINK $(cut -d' ' -f1 /proc/uptime)"

if [ -x /run.sh ]; then
    sh -c '. /etc/vp-env.sh; . /run.sh'
    echo "VP-RUN-EXIT $?"
    poweroff -f
fi

# Commands arrive on the console, one per line, with echo off so that a test reads only their
# output. `read` takes exactly one line from the tty; busybox sh reading a script from a pipe
# was seen to lose lines that arrived together.
dmesg -n 1
stty -echo 2>/dev/null
echo "VP-SHELL"
while IFS= read -r line; do eval "$line"; done
poweroff -f
