//! `cargo xtask demo`.
use anyhow::Result;

use crate::Workspace;

pub fn run(ws: &Workspace) -> Result<()> {
    crate::plugins::build(ws)?;
    Ok(())
}
