//! Command-line options for volumes on Ceph RBD: `--backend rbd:POOL[/IMAGE]` and the Ceph
//! connection options, spelled as the `rbd` tool spells them (`--ceph-conf` for its `-c/--conf`,
//! `--ceph-id`, `--keyring`); unset ones fall back to `$CEPH_CONF`, `/etc/ceph/ceph.conf`,
//! `client.admin` and `$CEPH_ARGS`, as for every Ceph client.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use cryptnbd::backend::rbd::{check_rbd_name, CephClient, RbdLocation, SUPPORTED};

/// What `--help` says about RBD in this build.
pub const RBD_SUPPORT: &str = if SUPPORTED {
    "This binary can put volumes on Ceph RBD images (`volume create NAME --backend rbd:POOL`)."
} else {
    "This binary was built WITHOUT Ceph RBD support (cargo feature `rbd`): file volumes only; \
     RBD volumes are listed but cannot be opened."
};

#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Where the volume's data lives: `file` (DATA_DIR/volumes/NAME.vol, the default) or
    /// `rbd:POOL[/IMAGE]` (a new Ceph RBD image; IMAGE defaults to the volume name). The data
    /// directory then keeps only a reference to the image.
    #[arg(long, default_value = "file", value_name = "file|rbd:POOL[/IMAGE]")]
    backend: String,

    #[command(flatten)]
    ceph: CephArgs,
}

/// How to reach the Ceph cluster, for RBD volumes and RADOS key stores alike. The values are
/// recorded (in the volume's reference, in the key store's marker) so later commands and the
/// server connect the same way.
#[derive(Args, Debug, Clone, Default)]
pub struct CephArgs {
    /// Ceph config file (default: $CEPH_CONF, then /etc/ceph/ceph.conf). Recorded with the volume
    /// or key store.
    #[arg(long, value_name = "FILE", env = "CEPH_CONF")]
    ceph_conf: Option<PathBuf>,

    /// Ceph client id, without `client.` (default: admin). Recorded with the volume or key store.
    #[arg(long, value_name = "ID")]
    ceph_id: Option<String>,

    /// Ceph keyring (default: the one the config names). Recorded with the volume or key store.
    #[arg(long, value_name = "FILE")]
    keyring: Option<PathBuf>,
}

impl CephArgs {
    /// Refuses `--ceph-id`/`--keyring` when nothing uses Ceph (`--ceph-conf` may come from
    /// `$CEPH_CONF`, so it is not an error); `needs` names the option that would use them.
    pub fn refuse_unused(&self, needs: &str) -> anyhow::Result<()> {
        if self.ceph_id.is_some() || self.keyring.is_some() {
            bail!("--ceph-id and --keyring only apply to {needs}");
        }
        Ok(())
    }

    /// The settings to record: paths made absolute (a recorded path must not depend on the
    /// current directory), the id without its `client.` prefix.
    pub fn client(&self) -> CephClient {
        let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        CephClient {
            ceph_conf: self.ceph_conf.as_ref().map(absolute),
            client_id: self
                .ceph_id
                .as_ref()
                .map(|i| i.strip_prefix("client.").unwrap_or(i).to_string()),
            keyring: self.keyring.as_ref().map(absolute),
        }
    }
}

impl BackendArgs {
    /// The RBD image for volume `name`, or `None` for a file volume.
    pub fn location(&self, name: &str) -> anyhow::Result<Option<RbdLocation>> {
        let rest = match self.backend.as_str() {
            "file" => {
                self.ceph.refuse_unused("--backend rbd:POOL[/IMAGE]")?;
                return Ok(None);
            }
            b => match b.strip_prefix("rbd:") {
                Some(rest) => rest,
                None => bail!("unknown --backend {b:?}: use `file` or `rbd:POOL[/IMAGE]`"),
            },
        };
        let (pool, image) = match rest.split_once('/') {
            Some((p, i)) => (p, i),
            None => (rest, name),
        };
        check_rbd_name("pool", pool).map_err(anyhow::Error::msg)?;
        check_rbd_name("image", image).map_err(anyhow::Error::msg)?;
        if !SUPPORTED {
            bail!("{RBD_SUPPORT}");
        }
        Ok(Some(RbdLocation {
            pool: pool.to_string(),
            image: image.to_string(),
            ceph: self.ceph.client(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(backend: &str) -> BackendArgs {
        BackendArgs {
            backend: backend.into(),
            ceph: CephArgs {
                ceph_conf: Some("c.conf".into()),
                ceph_id: Some("client.gw".into()),
                keyring: None,
            },
        }
    }

    #[test]
    fn backend_spec() {
        if SUPPORTED {
            let l = args("rbd:pool1").location("vm1").unwrap().unwrap();
            assert_eq!((l.pool.as_str(), l.image.as_str()), ("pool1", "vm1"));
            assert_eq!(l.ceph.client_id.as_deref(), Some("gw"));
            assert!(l.ceph.ceph_conf.unwrap().is_absolute());
            let l = args("rbd:p/img").location("vm1").unwrap().unwrap();
            assert_eq!(l.image, "img");
        } else {
            assert!(args("rbd:pool1").location("vm1").is_err());
        }
        assert!(
            args("file").location("vm1").is_err(),
            "ceph options without rbd"
        );
        let mut f = args("file");
        f.ceph.ceph_id = None;
        assert!(f.location("vm1").unwrap().is_none());
        for bad in ["nfs:x", "rbd:", "rbd:p/a@snap", "rbd:p/"] {
            assert!(args(bad).location("vm1").is_err(), "{bad}");
        }
    }
}
