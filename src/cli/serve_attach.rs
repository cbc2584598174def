//! What `serve` prints once it listens: the commands that attach an export through each
//! listener with the clients people use (the kernel's `nbd-client`, QEMU, fio, libnbd), so a
//! first-time user can copy one line instead of looking up each client's URI syntax.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The commands a user runs to attach `name` through each listener (`tls`: the TCP listeners
/// require TLS; the client files are then expected in `/etc/pki/libnbd` or a directory the
/// user names).
pub fn attach_commands(name: &str, tcp: &[SocketAddr], unix: &[PathBuf], tls: bool) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str("  ");
        s.push_str(&l);
        s.push('\n');
    };
    for p in unix {
        let p = p.display();
        let uri = format!("nbd+unix:///{name}?socket={p}");
        line(format!("nbd-client -N {name} -b 4096 -unix {p} /dev/nbd0"));
        line(format!(
            "qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio,cache=none"
        ));
        line(format!(
            "qemu-system-x86_64 ... -blockdev driver=nbd,node-name={name},export={name},server.type=unix,server.path={p}"
        ));
        line(format!(
            "fio --name=test --ioengine=nbd --uri='{uri}' --rw=randrw --bs=4k --size=1G"
        ));
        line(format!("nbdinfo '{uri}'"));
    }
    for a in tcp {
        let (host, port) = (a.ip(), a.port());
        if tls {
            // CA + client certificate + key in DIR as ca-cert.pem, client-cert.pem,
            // client-key.pem (libnbd and qemu use the same names; README "Security").
            let uri = format!("nbds://{host}:{port}/{name}?tls-certificates=DIR");
            line(format!(
                "nbd-client -N {name} -b 4096 -cacertfile DIR/ca-cert.pem -certfile DIR/client-cert.pem -keyfile DIR/client-key.pem -tlshostname HOST {host} {port} /dev/nbd0"
            ));
            line(format!(
                "qemu-system-x86_64 ... -object tls-creds-x509,id=tls0,dir=DIR,endpoint=client -blockdev driver=nbd,node-name={name},export={name},server.type=inet,server.host={host},server.port={port},tls-creds=tls0"
            ));
            line(format!(
                "fio --name=test --ioengine=nbd --uri='nbds://{host}:{port}/{name}' --rw=randrw --bs=4k --size=1G   # files in ~/.pki/libnbd/"
            ));
            line(format!("nbdinfo '{uri}'"));
            continue;
        }
        let uri = format!("nbd://{host}:{port}/{name}");
        line(format!(
            "nbd-client -N {name} -b 4096 {host} {port} /dev/nbd0"
        ));
        line(format!(
            "qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio,cache=none"
        ));
        line(format!(
            "qemu-system-x86_64 ... -blockdev driver=nbd,node-name={name},export={name},server.type=inet,server.host={host},server.port={port}"
        ));
        line(format!(
            "fio --name=test --ioengine=nbd --uri='{uri}' --rw=randrw --bs=4k --size=1G"
        ));
        line(format!("nbdinfo '{uri}'"));
    }
    s
}
