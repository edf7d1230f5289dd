#!/bin/busybox sh
# /init of the qkd-macsec test VM (built by `cargo xtask setup`; see docs/testing.md).
#
# The kernel command line gives (as environment variables, since they contain no dot):
#   qkd_nonce    unique per run; every line for the host carries it
#   qkd_job      path (on the host's root filesystem) of the job script to run after chroot
#   qkd_modtree  path (on the host's root filesystem) of the unpacked lib/modules/<version> tree
#   qkd_kver     kernel version
# The host shares its root filesystem read-only over virtio 9p (mount tag hostroot); a tmpfs upper
# layer makes it writable inside the VM only. The serial console is the only channel back: the host
# parses "QKD-VM-START <nonce>" (command starts) and "QKD-VM-RESULT <nonce> <status>".

/bin/busybox mkdir -p /bin /proc /sys /dev /mnt/host /mnt/rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "QKD-VM-INITFAIL $qkd_nonce $*"
    poweroff -f
    sleep 10
}

while read -r m; do
    insmod "/modules/$m" || fail "insmod $m failed"
done < /modules.list

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose hostroot /mnt/host ||
    fail "mounting the host root over 9p failed"
mount -t tmpfs -o mode=0755 rw /mnt/rw || fail "tmpfs for the overlay failed"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot ||
    fail "overlay over the host root failed"

R=/newroot
mount -t proc proc $R/proc || fail "proc in the new root"
mount -t sysfs sysfs $R/sys || fail "sysfs in the new root"
mount --bind /dev $R/dev || fail "/dev in the new root"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=0755 run $R/run || fail "tmpfs on /run"
# A clean /tmp, except when the job (and so the checkout it runs from) lives under the host's
# /tmp: a tmpfs would hide it. Then /tmp stays the overlay: the host's files, writes in VM memory.
case "$qkd_job" in
/tmp/*) ;;
*) mount -t tmpfs -o mode=1777 tmp $R/tmp || fail "tmpfs on /tmp" ;;
esac
mount -t bpf bpf $R/sys/fs/bpf || fail "bpffs on /sys/fs/bpf"
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null

# The host has no /lib/modules; the guest's module tree is the unpacked Debian package.
mkdir -p $R/lib/modules
rm -rf "$R/lib/modules/$qkd_kver"
ln -s "$qkd_modtree" "$R/lib/modules/$qkd_kver" || fail "linking the module tree"

hostname qkd-vm
ip link set lo up 2>/dev/null

[ -r "$R$qkd_job" ] || fail "job script $qkd_job not visible in the VM"
echo "QKD-VM-START $qkd_nonce"
# Through a pipe rather than straight to the console: the job's output is not a terminal, so
# programs behave as they do under CI (no colours, no interactive prompts).
echo 125 > /qkd_rc
(
    env -i /bin/chroot $R /bin/sh "$qkd_job" < /dev/null
    echo $? > /qkd_rc
) 2>&1 | cat
rc=$(cat /qkd_rc)
echo "QKD-VM-RESULT $qkd_nonce $rc"
sync
poweroff -f
sleep 10
