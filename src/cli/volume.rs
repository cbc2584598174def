//! `cryptnbd volume`: SKELETON, to be written.

use clap::Args;

use super::Global;

#[derive(Args, Debug)]
pub struct VolumeArgs {}

pub fn run(_global: &Global, _args: VolumeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`volume` is not implemented yet")
}
