#!/usr/bin/env bash
# Build the test guest: a Debian kernel and a busybox initramfs, into qemu/.cache/guest/.
#
# Nothing is installed on the host: the kernel and busybox-static packages are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x`. iperf3, ethtool, ip and iputils' ping
# (for `ping -M do`) come from the host, which needs them for the peer namespace anyway, with
# the shared libraries `ldd` names.
#
# Output (reused when present and up to date):
#   qemu/.cache/guest/vmlinux         uncompressed kernel, booted directly (PVH) by qemu/boot.sh
#   qemu/.cache/guest/initramfs.gz    busybox, modules, tools, /init (qemu/guest-init.sh)
#
# Usage: qemu/build-guest.sh [--force]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${VP_GUEST_CACHE:-$here/.cache/guest}"
force=0
[ "${1:-}" = "--force" ] && force=1

say() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: $*" >&2; exit 1; }

for tool in apt-get apt-cache dpkg-deb cpio gzip xz ldd iperf3 ethtool ip ping; do
    command -v "$tool" >/dev/null || die "needs $tool (Debian: apt-get install apt dpkg cpio gzip xz-utils libc-bin iperf3 ethtool iproute2 iputils-ping)"
done

# The initramfs is rebuilt whenever this script or /init changes.
stamp_want="$(cat "$here/build-guest.sh" "$here/guest-init.sh" | sha256sum | cut -c1-16)"
if [ "$force" = 0 ] && [ -s "$cache/vmlinux" ] && [ -s "$cache/initramfs.gz" ] &&
    [ "$(cat "$cache/stamp" 2>/dev/null)" = "$stamp_want" ]; then
    say "up to date: $cache ($(cat "$cache/kernel-release"))"
    exit 0
fi
mkdir -p "$cache/debs"

# apt-get download needs package lists; fetch them once if this machine has none.
download() {
    (cd "$cache/debs" && apt-get download "$@" >/dev/null 2>&1) && return 0
    say "apt-get update (no package lists for $*)"
    apt-get update -qq >/dev/null
    (cd "$cache/debs" && apt-get download "$@" >/dev/null) || die "apt-get download $* failed"
}

# linux-image-amd64 is a metapackage: its dependency names the real kernel package.
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kpkg" ]; then
    apt-get update -qq >/dev/null
    kpkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
fi
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 to a kernel package"
ls "$cache/debs/${kpkg}"_*.deb >/dev/null 2>&1 || { say "downloading $kpkg"; download "$kpkg"; }
ls "$cache/debs"/busybox-static_*.deb >/dev/null 2>&1 || { say "downloading busybox-static"; download busybox-static; }

work="$(mktemp -d "${TMPDIR:-/tmp}/vp-guest.XXXXXX")"
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$(ls "$cache/debs/${kpkg}"_*.deb | head -1)" "$work/kernel"
dpkg-deb -x "$(ls "$cache/debs"/busybox-static_*.deb | head -1)" "$work/busybox"
krel="$(ls "$work/kernel/lib/modules" | head -1)"
config="$work/kernel/boot/config-$krel"
say "kernel $krel"

# PVH direct boot needs the ELF vmlinux; Debian ships a bzImage whose payload is xz-compressed.
grep -q '^CONFIG_PVH=y' "$config" || die "$krel is not built with CONFIG_PVH"
grep -q '^CONFIG_KERNEL_XZ=y' "$config" || die "$krel: only xz-compressed bzImages are handled"
bz="$work/kernel/boot/vmlinuz-$krel"
offsets="$(LC_ALL=C grep -obaP '\xfd7zXZ\x00' "$bz" | cut -d: -f1 || true)"
off="${offsets%%$'\n'*}"
[ -n "$off" ] || die "no xz payload in $bz"
tail -c +"$((off + 1))" "$bz" | xz -dc --single-stream >"$work/vmlinux" 2>/dev/null || true
head -c 4 "$work/vmlinux" | grep -q 'ELF' || die "could not extract vmlinux from $bz"

# Modules the guest needs, unless built in. Dependencies come from each module's .modinfo
# "depends=" (there is no depmod on the host); /lib/modules/order/NAME lists the files to insmod
# for NAME, dependencies first, which /init follows.
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib/modules/order}
moddir="$work/kernel/lib/modules/$krel/kernel"
module_file() { find "$moddir" -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" | head -1; }
module_deps() { LC_ALL=C grep -ao 'depends=[a-z0-9_,-]*' "$1" | head -1 | cut -d= -f2 | tr ',' ' '; }
# Print the load order for a module: its dependencies (recursively) first.
load_order() {
    local f dep
    f="$(module_file "$1")"
    [ -n "$f" ] || die "module $1 not in $krel"
    for dep in $(module_deps "$f"); do load_order "$dep"; done
    echo "$f"
}
for m in virtio_pci virtio_net 8021q; do
    kconf="CONFIG_$(echo "$m" | tr 'a-z' 'A-Z')"
    [ "$m" = 8021q ] && kconf=CONFIG_VLAN_8021Q
    if grep -q "^$kconf=y" "$config"; then
        say "$m is built in"
        : >"$root/lib/modules/order/$m"
        continue
    fi
    load_order "$m" | awk '!seen[$0]++' | while read -r f; do
        cp "$f" "$root/lib/modules/"
        echo "/lib/modules/$(basename "$f")"
    done >"$root/lib/modules/order/$m"
    say "$m: $(xargs -n1 basename <"$root/lib/modules/order/$m" | tr '\n' ' ')"
done

# Busybox provides the shell and the applets; the real ip/ethtool/iperf3 take precedence.
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
copy_with_libs() {
    local bin="$1" dest="$2"
    cp "$bin" "$root$dest"
    ldd "$bin" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
copy_with_libs "$(command -v iperf3)" /usr/bin/iperf3
copy_with_libs "$(command -v ethtool)" /usr/sbin/ethtool
copy_with_libs "$(command -v ip)" /usr/sbin/ip
copy_with_libs "$(command -v ping)" /usr/bin/ping
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || { mkdir -p "$root/lib64" && cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"; }
cp "$here/guest-init.sh" "$root/init"
chmod 755 "$root/init"
echo "$krel" >"$root/etc/kernel-release"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initramfs.gz"
mv "$work/vmlinux" "$cache/vmlinux"
mv "$work/initramfs.gz" "$cache/initramfs.gz"
echo "$krel" >"$cache/kernel-release"
echo "$stamp_want" >"$cache/stamp"
say "built $cache: vmlinux ($(du -h "$cache/vmlinux" | cut -f1)), initramfs.gz ($(du -h "$cache/initramfs.gz" | cut -f1))"
