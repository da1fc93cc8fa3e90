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
load virtio_pci
load virtio_net
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
if [ ! -e /sys/class/net/eth0 ]; then
    echo "VP-ERROR no eth0"
    poweroff -f
fi
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device")" = "0x0001" ] && echo "VP-FEATURES $(cat "$d/features")"
done

ip link set lo up
[ -n "$(arg mtu)" ] && ip link set eth0 mtu "$(arg mtu)"
ip link set eth0 up
[ -n "$(arg addr)" ] && ip addr add "$(arg addr)" dev eth0
[ -n "$(arg addr6)" ] && ip -6 addr add "$(arg addr6)" dev eth0 nodad
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
