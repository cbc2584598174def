#!/bin/busybox sh
# /init of the QEMU guest booted by tools/vhost-guest: its disks are cryptnbd vhost-user-blk
# exports served by the host. /dev/vda: a read-write volume (num-queues=2), /dev/vdb: a read-only
# volume holding a known pattern, /dev/vdc: vda's volume file as a plain read-only disk and
# /dev/vdd: its data key (for the dm-crypt cross-check).
#
# Markers on the console: "GUEST-STEP <name> ok" per step, "GUEST-INFO …", "GUEST-RESTART-NOW"
# (the host then kills cryptnbd and starts it again while this guest keeps writing), and at the
# end "GUEST-RESULT PASS" or "GUEST-RESULT FAIL <step>". GNU tools are called by full path.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=400m tmp /tmp
mkdir -p /run/cryptsetup /mnt /mnt2
echo /sbin/modprobe >/proc/sys/kernel/modprobe
exec </dev/null

current=boot
fail() {
  echo "GUEST-RESULT FAIL $current${1:+: $1}"
  dmesg | tail -n 30
  sync
  poweroff -f
}
step() { current="$1"; }
ok() { echo "GUEST-STEP $current ok (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
sum() { sha256sum "$1" | cut -d' ' -f1; }
# rd DEV SKIP_MIB COUNT_MIB: the sha256 of a region, read around the guest's page cache.
rd() { /gnu/dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }

(
  sleep "${GUEST_WATCHDOG:-400}"
  echo "GUEST-RESULT FAIL watchdog: the guest ran longer than ${GUEST_WATCHDOG:-400}s"
  echo w >/proc/sysrq-trigger
  dmesg | tail -n 60
  ps
  sync
  poweroff -f
) &

step modules
for m in virtio_pci virtio_blk ext4 dm_crypt xts aesni_intel crc32c_generic; do
  modprobe $m || fail "modprobe $m"
done
i=0
while [ ! -b /dev/vdd ]; do
  i=$((i + 1))
  [ $i -gt 100 ] && fail "the four virtio disks did not appear: $(ls /sys/block)"
  sleep 0.1
done
ok

step virtio-config
Q=/sys/block/vda
lbs=$(cat $Q/queue/logical_block_size)
nq=$(ls $Q/mq | wc -l)
serial=$(cat $Q/serial 2>/dev/null)
echo "GUEST-INFO vda size=$(blockdev --getsize64 /dev/vda) logical_block_size=$lbs queues=$nq serial=$serial discard_max=$(cat $Q/queue/discard_max_bytes) write_zeroes_max=$(cat $Q/queue/write_zeroes_max_bytes) cache=$(cat $Q/queue/write_cache) ro=$(cat $Q/ro)"
[ "$lbs" = 4096 ] || fail "logical block size $lbs, expected the encryption sector 4096"
[ "$nq" = 2 ] || fail "$nq queues, expected 2"
[ "$serial" = "$VOL_SERIAL" ] || fail "serial $serial, expected $VOL_SERIAL"
[ "$(cat $Q/queue/write_cache)" = "write back" ] || fail "no volatile write cache: FLUSH not offered"
[ "$(cat $Q/queue/discard_max_bytes)" != 0 ] || fail "no discard"
ok

step read-only-export
[ "$(cat /sys/block/vdb/ro)" = 1 ] || fail "vdb is not read-only"
[ "$(rd /dev/vdb 0 8)" = "$RO_SUM" ] || fail "vdb does not read back the pattern the host put there"
if /gnu/dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/tmp/ro.err; then
  fail "a write to the read-only disk succeeded"
fi
echo "GUEST-INFO write to vdb refused: $(cat /tmp/ro.err | head -n 1)"
[ "$(rd /dev/vdb 0 8)" = "$RO_SUM" ] || fail "vdb changed"
ok

step pattern-before-restart
/gnu/dd if=/dev/urandom of=/tmp/a bs=1M count=32 2>/dev/null || fail "urandom"
/gnu/dd if=/dev/urandom of=/tmp/b bs=1M count=96 2>/dev/null || fail "urandom"
/gnu/dd if=/tmp/a of=/dev/vda bs=1M seek=0 oflag=direct conv=fsync 2>/dev/null || fail "writing pattern a"
[ "$(rd /dev/vda 0 32)" = "$(sum /tmp/a)" ] || fail "pattern a does not read back"
ok

step restart-under-load
echo "GUEST-RESTART-NOW"
# Written while the host kills cryptnbd and starts it again: requests in flight then are redone.
/gnu/dd if=/tmp/b of=/dev/vda bs=256k seek=128 oflag=direct conv=fsync 2>/tmp/b.err || fail "writing pattern b across the restart: $(cat /tmp/b.err)"
[ "$(rd /dev/vda 0 32)" = "$(sum /tmp/a)" ] || fail "pattern a changed across the restart"
[ "$(rd /dev/vda 32 96)" = "$(sum /tmp/b)" ] || fail "pattern b does not read back after the restart"
ok

step ext4-fsck-fstrim
/gnu/mkfs.ext4 -q -F -b 4096 /dev/vda || fail mkfs
mount /dev/vda /mnt || fail mount
/gnu/dd if=/dev/urandom of=/mnt/f1 bs=1M count=24 2>/dev/null || fail "write f1"
cp /tmp/a /mnt/f2 || fail "write f2"
mkdir /mnt/d && echo hello >/mnt/d/small || fail "small file"
sync
rm /mnt/f1 || fail rm
fstrim -v /mnt >/tmp/trim 2>&1 || fail "fstrim: $(cat /tmp/trim)"
echo "GUEST-INFO $(cat /tmp/trim)"
cp /tmp/b /mnt/f3 || fail "write f3"
s2=$(sum /mnt/f2)
s3=$(sum /mnt/f3)
umount /mnt || fail umount
echo 3 >/proc/sys/vm/drop_caches
/gnu/fsck.ext4 -fn /dev/vda >/tmp/fsck 2>&1 || fail "fsck: $(tail -n 5 /tmp/fsck)"
mount -o ro /dev/vda /mnt || fail "mount again"
[ "$(sum /mnt/f2)" = "$(sum /tmp/a)" ] && [ "$(sum /mnt/f3)" = "$s3" ] && [ "$s2" = "$(sum /tmp/a)" ] ||
  fail "files differ after remount"
umount /mnt
ok

step dm-crypt-cross-check
# The volume file itself, opened by dm-crypt with the data key (README: recovering data by hand).
cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --key-file /dev/vdd \
  --keyfile-size 64 --offset 2048 --sector-size 4096 --readonly /dev/vdc direct 2>/tmp/cs ||
  fail "cryptsetup: $(cat /tmp/cs)"
mount -o ro,noload /dev/mapper/direct /mnt2 || fail "mounting the dm-crypt mapping"
[ "$(sum /mnt2/f2)" = "$(sum /tmp/a)" ] || fail "f2 differs through dm-crypt"
[ "$(sum /mnt2/f3)" = "$(sum /tmp/b)" ] || fail "f3 differs through dm-crypt"
[ "$(cat /mnt2/d/small)" = hello ] || fail "small file differs through dm-crypt"
umount /mnt2
cryptsetup close direct
ok

sync
echo "GUEST-RESULT PASS"
poweroff -f
