//! `tpi cluster`: the cluster credential (a private CA plus per-device certificates).
//! Every QUIC connection is mutually authenticated against that CA.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tpi_node::net::{CaBundle, Role};

/// `tpi cluster` subcommands.
#[derive(Args, Debug)]
pub struct ClusterCmd {
    #[command(subcommand)]
    pub what: ClusterWhat,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum ClusterWhat {
    /// Create a cluster CA and this machine's credential.
    Init {
        /// Where to keep the CA and credential.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
        /// Replace an existing CA (every device then needs a new credential).
        #[arg(long)]
        force: bool,
        /// Role of this machine's credential: coordinator (starts sessions), node
        /// (serves a rank) or both.
        #[arg(long, default_value = "coordinator")]
        role: Role,
    },
    /// Issue a credential for another device from the cluster CA.
    Issue {
        /// The directory given to `init`.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
        /// The device's name (certificate CN).
        #[arg(long)]
        name: String,
        /// Where to write ca.pem, cert.pem and key.pem (copy it to the device).
        #[arg(long)]
        out: PathBuf,
        /// What the device may do: node (serve a rank with `tpi-node`), coordinator (start
        /// sessions with `tpi run/chat/serve`) or both. Nodes refuse sessions from
        /// credentials without the coordinator role.
        #[arg(long, default_value = "node")]
        role: Role,
    },
}

fn default_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".config/tpi"))
        .unwrap_or_else(|| PathBuf::from(".tpi"))
}

fn load_ca(dir: &std::path::Path) -> anyhow::Result<CaBundle> {
    let ca = dir.join("ca");
    Ok(CaBundle {
        cert_pem: std::fs::read_to_string(ca.join("ca.pem")).with_context(|| {
            format!("no cluster CA in {} (run `tpi cluster init`)", ca.display())
        })?,
        key_pem: std::fs::read_to_string(ca.join("ca-key.pem"))
            .with_context(|| format!("no CA key in {}", ca.display()))?,
    })
}

/// Runs `tpi cluster`.
pub fn cluster(c: ClusterCmd) -> anyhow::Result<()> {
    match c.what {
        ClusterWhat::Init { dir, force, role } => {
            let ca_dir = dir.join("ca");
            if ca_dir.join("ca.pem").exists() && !force {
                bail!(
                    "a cluster CA already exists in {} (use --force to replace it)",
                    ca_dir.display()
                );
            }
            let ca = CaBundle::generate()?;
            std::fs::create_dir_all(&ca_dir)?;
            std::fs::write(ca_dir.join("ca.pem"), &ca.cert_pem)?;
            let key = ca_dir.join("ca-key.pem");
            std::fs::write(&key, &ca.key_pem)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
            }
            let cred = ca.issue("tpi-coordinator", role)?;
            let cred_dir = dir.join("credential");
            cred.save(&cred_dir)?;
            println!("cluster CA: {}", ca_dir.display());
            println!("this machine's credential ({role}): {}", cred_dir.display());
            println!(
                "for each device: tpi cluster issue --name NAME --out DIR, copy DIR there, and run tpi-node serve --credential DIR"
            );
        }
        ClusterWhat::Issue {
            dir,
            name,
            out,
            role,
        } => {
            let ca = load_ca(&dir)?;
            let cred = ca.issue(&name, role)?;
            cred.save(&out)?;
            println!("credential for {name} ({role}): {}", out.display());
        }
    }
    Ok(())
}
