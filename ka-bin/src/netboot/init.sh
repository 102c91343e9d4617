#!/bin/sh
# The init of the ka netboot image (PID 1, busybox sh), written by
# `ka netboot build`. It does what only a shell at PID 1 can: mount the
# kernel's file systems, load the drivers (in the order computed at build
# time), keep a rescue shell on the second console, run
# `ka netboot install`, and reboot or stay depending on how that ended.
# The kernel command-line contract is in docs/netboot.md.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/ka
# What this init prints on the console goes to this file too; ka netboot
# install copies its own lines there and its ka join sends the file to
# the source (--console-log), which keeps it in the node's log.
: > /run/ka/console.log

say() {
  echo "ka-netboot: $*"
  echo "ka-netboot: $*" >> /run/ka/console.log
}

# Kernel chatter would break up the progress lines: warnings and worse only.
dmesg -n 4 2>/dev/null

say "$(uname -r); $(ka --version)"
while read -r mod; do
  insmod "/lib/modules/ka/$mod" 2>/dev/null || {
    # Already loaded, or a driver whose hardware pulled in nothing: harmless
    # unless the NIC or disk is then missing, which ka reports by name.
    grep -q "^${mod%.ko} " /proc/modules || say "could not load $mod"
  }
done < /etc/ka/modules

# A rescue shell on the second console, as in the original Ka: an
# administrator can look around while the clone runs or after it failed.
if [ -c /dev/tty2 ]; then
  (while :; do setsid -c sh </dev/tty2 >/dev/tty2 2>&1; sleep 1; done) &
fi

stay() {
  say "$*"
  while :; do setsid -c sh </dev/console >/dev/console 2>&1; done
}

ka netboot install
case $? in
  0)
    say "rebooting into the new system"
    sync
    reboot -f
    ;;
  3) stay "staying: the copy has no identity of its own (see above)" ;;
  4) stay "staying, as ka.fail_delay=never asks" ;;
  10) stay "shell (ka.mode=shell); reboot -f when done" ;;
  *)
    # ka has printed why and waited ka.fail_delay: try again from the start.
    sync
    reboot -f
    ;;
esac
# Not reached unless reboot failed; PID 1 must never exit.
stay "reboot failed"
