#!/usr/bin/env bash
# Installs the system programs vzdump-ts needs, when they are missing.
#
#   runtime: qemu-system-x86 qemu-utils qemu-guest-agent libnbd-bin nbdkit zstd lzop
#   tests:   e2fsprogs (e2fsck/mkfs.ext4 for guest images), busybox-static and linux-image-amd64
#            (the small TCG guest the freeze tests boot), pigz, cpio
#
# As root on Debian/Ubuntu it runs `apt-get install -y --no-install-recommends` for what is missing;
# anywhere else it prints exactly what to install and exits non-zero.
set -euo pipefail

runtime=(qemu-system-x86 qemu-utils qemu-guest-agent libnbd-bin nbdkit zstd lzop)
testing=(e2fsprogs busybox-static linux-image-amd64 pigz cpio)

# package -> a file whose presence shows it is installed
probe() {
  case "$1" in
    qemu-system-x86) echo /usr/bin/qemu-system-x86_64 ;;
    qemu-utils) echo /usr/bin/qemu-img ;;
    qemu-guest-agent) echo /usr/sbin/qemu-ga ;;
    libnbd-bin) echo /usr/bin/nbdinfo ;;
    nbdkit) echo /usr/bin/nbdkit ;;
    zstd) echo /usr/bin/zstd ;;
    lzop) echo /usr/bin/lzop ;;
    e2fsprogs) echo /sbin/e2fsck ;;
    busybox-static) echo /bin/busybox ;;
    linux-image-amd64) ls /boot/vmlinuz-* 2>/dev/null | head -n 1 || true ;;
    pigz) echo /usr/bin/pigz ;;
    cpio) echo /usr/bin/cpio ;;
  esac
}

missing=()
for pkg in "${runtime[@]}" "${testing[@]}"; do
  file=$(probe "$pkg")
  if [ -z "$file" ] || { [ ! -e "$file" ] && ! command -v "$(basename "$file")" >/dev/null 2>&1; }; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "prerequisites: all present"
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "prerequisites: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "prerequisites: installed"
else
  echo "prerequisites missing: ${missing[*]}" >&2
  echo "install them with:" >&2
  echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
