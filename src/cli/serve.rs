//! `cryptnbd serve`: SKELETON, to be written.

use clap::Args;

use super::Global;

#[derive(Args, Debug)]
pub struct ServeArgs {}

pub fn run(_global: &Global, _args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`serve` is not implemented yet")
}
