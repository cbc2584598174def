#!/bin/busybox sh
# /init of the QEMU guest built by tools/kernel-guest: cryptnbd serves volumes on a Unix socket
# inside the guest, the kernel's NBD client (nbd.ko + nbd-client) attaches them, and dm-crypt
# opens the same volume file by hand with its data key (the README's recovery recipe).
#
# Markers on the console: "GUEST-STEP <name> ok" per step, "GUEST-INFO …" for facts worth
# seeing, and at the end "GUEST-RESULT PASS" or "GUEST-RESULT FAIL <step>". busybox applets win
# over PATH in this shell, so GNU tools are called by full path (/gnu/dd, /gnu/mkfs.ext4, …).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=1024m tmp /tmp
mkdir -p /run/cryptsetup /data /mnt
echo /sbin/modprobe >/proc/sys/kernel/modprobe
exec </dev/null

D=/data
SOCK=$D/nbd.sock
current=boot
fail() {
  echo "GUEST-RESULT FAIL $current${1:+: $1}"
  dmesg | tail -n 30
  [ -f /tmp/serve.log ] && tail -n 30 /tmp/serve.log
  sync
  poweroff -f
}
# step NAME: starts a step; ok: ends it.
step() { current="$1"; }
ok() { echo "GUEST-STEP $current ok (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
cn() { /usr/bin/cryptnbd --data-dir $D "$@"; }

# A watchdog: a hung step must end the run with a diagnosis rather than the host's timeout.
# (GUEST_WATCHDOG and GUEST_ONLY come from the kernel command line, set by tools/kernel-guest.)
(
  sleep "${GUEST_WATCHDOG:-400}"
  echo "GUEST-RESULT FAIL watchdog: the guest ran longer than ${GUEST_WATCHDOG:-400}s"
  echo w >/proc/sysrq-trigger
  dmesg | tail -n 80
  tail -n 40 /tmp/serve.log
  ps
  sync
  poweroff -f
) &
# want GROUP: whether a group of steps runs (all unless GUEST_ONLY names some, for debugging).
want() { [ -z "$GUEST_ONLY" ] || case ",$GUEST_ONLY," in *",$1,"*) true ;; *) false ;; esac; }

step modules
for m in nbd ext4 dm_crypt loop xts aesni_intel crc32c_generic; do
  modprobe $m || fail "modprobe $m"
done
ok

step setup
cn kms init >/dev/null || fail "kms init"
cn kms create-key --alias guest >/dev/null || fail "create-key"
cn volume create vol --size 256M --key alias/guest >/dev/null || fail "volume create vol"
cn volume create raw --size 16M --key alias/guest >/dev/null || fail "volume create raw"
cn volume create mc --size 128M --key alias/guest >/dev/null || fail "volume create mc"
ok

SERVER=
# serve [OPTIONS]: starts the server on $SOCK (plus OPTIONS) and waits until it listens.
serve() {
  rm -f $SOCK
  # Not through the `cn` function: $! must be the server itself, not a subshell.
  /usr/bin/cryptnbd --data-dir $D serve --socket $SOCK "$@" ${GUEST_ONLY:+-v} >>/tmp/serve.log 2>&1 &
  SERVER=$!
  i=0
  while [ ! -S $SOCK ]; do
    i=$((i + 1))
    [ $i -gt 300 ] && fail "server did not listen"
    sleep 0.1
  done
}
stop_server() {
  kill -TERM $SERVER
  wait $SERVER || fail "server exited with an error on SIGTERM"
  SERVER=
}
# attach DEV EXPORT [nbd-client options]: connects to $TARGET and waits until the device has its
# size.
TARGET="-unix $SOCK"
attach() {
  dev=$1 exp=$2
  shift 2
  # The argument order the README and `cryptnbd serve` show.
  nbd-client -N $exp "$@" $TARGET $dev >>/tmp/nbd-client.log 2>&1 || {
    cat /tmp/nbd-client.log
    fail "nbd-client $exp $*"
  }
  n=$(basename $dev)
  i=0
  while [ "$(cat /sys/block/$n/size)" = 0 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "$dev has no size"
    sleep 0.1
  done
  echo "GUEST-INFO $dev $exp $* logical_block_size=$(cat /sys/block/$n/queue/logical_block_size)" \
    "size=$(blockdev --getsize64 $dev)"
}
detach() {
  nbd-client -d $1 >>/tmp/nbd-client.log 2>&1 || fail "nbd-client -d $1"
}

step serve
serve
ok

if want fs; then
  step attach-b4096-mkfs
  attach /dev/nbd0 vol -b 4096
  [ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] || fail "logical block size not 4096"
  /gnu/mkfs.ext4 -q -F -L cryptnbd /dev/nbd0 || fail mkfs.ext4
  mount -t ext4 /dev/nbd0 /mnt || fail mount
  ok

  step files
  mkdir -p /mnt/sub/dir
  echo "cryptnbd in a guest" >/mnt/hello.txt
  dd if=/dev/urandom of=/mnt/big.bin bs=1M count=4 2>/dev/null || fail "write big.bin"
  dd if=/dev/urandom of=/mnt/sub/dir/odd.bin bs=1 count=123457 2>/dev/null || fail "write odd.bin"
  dd if=/dev/urandom of=/mnt/doomed.bin bs=1M count=6 2>/dev/null || fail "write doomed.bin"
  (cd /mnt && sha256sum hello.txt big.bin sub/dir/odd.bin >/tmp/sums) || fail sha256sum
  ok

  step fstrim
  sync
  rm /mnt/doomed.bin
  sync
  out=$(fstrim -v /mnt) || fail "fstrim: $out"
  echo "GUEST-INFO fstrim: $out"
  ok

  step detach
  umount /mnt || fail umount
  detach /dev/nbd0
  ok

  step server-restart
  stop_server
  serve
  ok

  step attach-512-fsck
  attach /dev/nbd0 vol
  [ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 512 ] || fail "logical block size not 512"
  /gnu/fsck.ext4 -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || {
    cat /tmp/fsck.log
    fail "fsck.ext4 -fn"
  }
  mount -t ext4 /dev/nbd0 /mnt || fail mount
  (cd /mnt && sha256sum -c /tmp/sums) || fail "checksums after restart"
  echo "written at 512" >/mnt/at512.txt
  (cd /mnt && sha256sum at512.txt >>/tmp/sums) || fail sha256sum
  umount /mnt || fail umount
  detach /dev/nbd0
  ok
fi

# O_DIRECT writes of whole 512-byte blocks at odd offsets (each a partial 4096-byte encryption
# sector), mirrored into a plain file; the device must read back equal to the file.
if want odirect; then
  step odirect-512
  attach /dev/nbd1 raw
  /gnu/dd if=/dev/zero of=/tmp/ref bs=1M count=16 2>/dev/null || fail "ref file"
  /gnu/dd if=/dev/urandom of=/tmp/pat bs=512 count=64 2>/dev/null || fail "pattern"
  for spec in "1 3" "9 1" "4095 5" "13 7" "8191 2" "20001 11" "32767 1" "7 64"; do
    set -- $spec
    /gnu/dd if=/tmp/pat of=/dev/nbd1 bs=512 seek=$1 count=$2 oflag=direct conv=notrunc,fsync \
      2>/tmp/dd.log || {
      cat /tmp/dd.log
      fail "O_DIRECT write at 512-block $1"
    }
    /gnu/dd if=/tmp/pat of=/tmp/ref bs=512 seek=$1 count=$2 conv=notrunc 2>/dev/null
  done
  /gnu/dd if=/dev/nbd1 of=/tmp/back bs=64k iflag=direct 2>/dev/null || fail "O_DIRECT read back"
  cmp /tmp/back /tmp/ref || fail "O_DIRECT data differs"
  detach /dev/nbd1
  sha256sum </tmp/ref >/tmp/ref.sum
  ok
fi

step multi-conn-4
if want mc; then
  attach /dev/nbd2 mc -b 4096 -connections 4
  /gnu/mkfs.ext4 -q -F /dev/nbd2 || fail "mkfs.ext4 over 4 connections"
  mount -t ext4 /dev/nbd2 /mnt || fail mount
  # Four writers at once; wait for them by pid (a bare `wait` would wait for the server too).
  pids=
  for i in 1 2 3 4; do
    dd if=/dev/urandom of=/mnt/mc$i.bin bs=64k count=24 2>/dev/null &
    pids="$pids $!"
  done
  for p in $pids; do wait $p || fail "writer $p"; done
  sync
  (cd /mnt && sha256sum mc1.bin mc2.bin mc3.bin mc4.bin >/tmp/mcsums) || fail sha256sum
  umount /mnt || fail umount
  detach /dev/nbd2
  attach /dev/nbd2 mc -b 4096
  /gnu/fsck.ext4 -fn /dev/nbd2 >/tmp/fsck.log 2>&1 || {
    cat /tmp/fsck.log
    fail "fsck.ext4 -fn after multi-conn"
  }
  mount -t ext4 -o ro /dev/nbd2 /mnt || fail mount
  (cd /mnt && sha256sum -c /tmp/mcsums) || fail "checksums after multi-conn"
  umount /mnt || fail umount
  detach /dev/nbd2
  ok
fi

step raw-after-restart
if want odirect; then
  stop_server
  serve
  attach /dev/nbd1 raw -b 4096
  /gnu/dd if=/dev/nbd1 bs=64k iflag=direct 2>/dev/null | sha256sum | cmp - /tmp/ref.sum ||
    fail "raw volume differs after restart"
  detach /dev/nbd1
  ok
fi
stop_server

# The kernel client over TLS with a client certificate (README "Security"): nbd-client does the
# TLS handshake itself (GnuTLS) and keeps a userspace proxy between nbd.ko and the TCP socket.
# Loopback inside the guest only; the certificates come from tools/kernel-guest (/certs).
if want tls; then
  step tls-client-cert
  ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up || fail "loopback up"
  cn volume create tlsvol --size 64M --key alias/guest >/dev/null || fail "volume create tlsvol"
  serve --listen 127.0.0.1:10809 --tls-cert /certs/server-cert.pem \
    --tls-key /certs/server-key.pem --tls-client-ca /certs/ca-cert.pem --allow cn:guest-client=tlsvol
  # Without TLS the server answers every option with TLS_REQD: no device.
  if nbd-client -N tlsvol -b 4096 127.0.0.1 10809 /dev/nbd3 >>/tmp/nbd-client.log 2>&1; then
    nbd-client -d /dev/nbd3 >/dev/null 2>&1
    fail "a plaintext nbd-client got the export"
  fi
  tls="-certfile /certs/client-cert.pem -keyfile /certs/client-key.pem -cacertfile /certs/ca-cert.pem -tlshostname localhost"
  TARGET="127.0.0.1 10809"
  attach /dev/nbd3 tlsvol -b 4096 $tls
  /gnu/mkfs.ext4 -q -F /dev/nbd3 || fail "mkfs.ext4 over TLS"
  mount -t ext4 /dev/nbd3 /mnt || fail "mount over TLS"
  dd if=/dev/urandom of=/mnt/tls.bin bs=64k count=32 2>/dev/null || fail "write over TLS"
  (cd /mnt && sha256sum tls.bin >/tmp/tlssums) || fail sha256sum
  umount /mnt || fail umount
  detach /dev/nbd3
  attach /dev/nbd3 tlsvol -b 4096 $tls
  /gnu/fsck.ext4 -fn /dev/nbd3 >/tmp/fsck.log 2>&1 || {
    cat /tmp/fsck.log
    fail "fsck.ext4 -fn over TLS"
  }
  mount -t ext4 -o ro /dev/nbd3 /mnt || fail "mount over TLS again"
  (cd /mnt && sha256sum -c /tmp/tlssums) || fail "checksums over TLS"
  umount /mnt || fail umount
  detach /dev/nbd3
  TARGET="-unix $SOCK"
  grep -q "TLS established" /tmp/serve.log || fail "the server saw no TLS session"
  echo "GUEST-INFO $(grep -c 'TLS established' /tmp/serve.log) TLS sessions; client cn:guest-client"
  stop_server
  ok
fi

# The README's by-hand recovery: the wrapped DEK and its context from `volume info --json`,
# unwrapped with `kms decrypt-datakey`, and the volume file opened by dm-crypt directly.
if want fs; then
  step dm-crypt-recovery
  cn volume info vol --json >/tmp/info.json || fail "volume info"
  field() { sed -n "s/^  \"$1\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" "$2"; }
  key_id=$(field key_id /tmp/info.json)
  wrapped=$(field cipher_text /tmp/info.json)
  volume_id=$(field volume_id /tmp/info.json)
  [ -n "$key_id" ] && [ -n "$wrapped" ] && [ -n "$volume_id" ] || fail "fields of volume info"
  cn kms decrypt-datakey "$key_id" --cipher-text "$wrapped" --context "volume_id=$volume_id" --json \
    >/tmp/dek.json || fail "decrypt-datakey"
  field plain_text /tmp/dek.json | xxd -r -p >/tmp/dek.bin
  [ "$(stat -c %s /tmp/dek.bin)" = 64 ] || fail "the DEK is not 64 bytes"
  cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 --key-file /tmp/dek.bin \
    --offset 2048 --sector-size 4096 $D/volumes/vol.vol vol || fail "cryptsetup open"
  mount -t ext4 -o ro /dev/mapper/vol /mnt || fail "mount /dev/mapper/vol"
  (cd /mnt && sha256sum -c /tmp/sums) || fail "checksums through dm-crypt"
  umount /mnt
  cryptsetup close vol || fail "cryptsetup close"
  ok
fi

echo "GUEST-RESULT PASS"
sync
poweroff -f
