//! `tpi nodes`: list the nodes announcing themselves over mDNS.

use std::time::Duration;

use clap::Args;
use tpi_coordinator::discovery;

/// `tpi nodes` flags.
#[derive(Args, Debug)]
pub struct NodesArgs {
    /// How long to listen for adverts (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Print JSON (one object with `nodes` and `warnings`).
    #[arg(long)]
    pub json: bool,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    tpi_sim::link::parse_duration(s).map_err(|e| e.to_string())
}

/// Runs `tpi nodes`.
pub fn nodes(a: NodesArgs) -> anyhow::Result<()> {
    let b = discovery::browse(a.timeout)?;
    if a.json {
        let v = serde_json::json!({ "nodes": b.nodes, "warnings": b.warnings });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for w in &b.warnings {
        eprintln!("warning: {w}");
    }
    if b.nodes.is_empty() {
        eprintln!("{}", discovery::nothing_found(a.timeout));
        return Ok(());
    }
    print!("{}", discovery::table(&b.nodes));
    Ok(())
}
