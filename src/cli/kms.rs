//! `cryptnbd kms`: SKELETON, to be written.

use clap::Args;

use super::Global;

#[derive(Args, Debug)]
pub struct KmsArgs {}

pub fn run(_global: &Global, _args: KmsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`kms` is not implemented yet")
}
