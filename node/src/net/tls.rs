//! Cluster credentials and mutual-TLS configuration for QUIC (TLS 1.3 only).
//!
//! Every cluster has one CA ([`CaBundle`]); every process holds a leaf certificate
//! signed by it ([`Credential`]). Both sides of every connection present their leaf and
//! verify the other's against the cluster CA: servers require a client certificate
//! (rustls `WebPkiClientVerifier`), clients check the server certificate for the fixed
//! name [`SERVER_NAME`], which every leaf carries as a DNS SAN, so IP addresses never
//! matter. There is deliberately no skip-verify mode. The ring crypto provider is used
//! explicitly; no process-default provider needs to be installed.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::error::NetError;
use super::options::TransportOptions;

/// The server name every leaf certificate carries and every client verifies.
pub const SERVER_NAME: &str = "tpi.cluster";

/// The ALPN protocol both sides must offer.
pub const ALPN: &[u8] = b"tpi/1";

const CA_COMMON_NAME: &str = "tpi cluster CA";

/// The prefix of the subject OU attribute that holds a credential's [`Role`].
const ROLE_PREFIX: &str = "tpi-role=";

/// What a credential may do in the cluster, written into its certificate (subject OU
/// `tpi-role=…`, signed by the cluster CA, so a device cannot change its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Starts sessions on nodes (the `tpi` CLI, rank 0).
    Coordinator,
    /// Serves a rank (`tpi-node`); cannot start sessions on other nodes.
    Node,
    /// Either.
    Both,
}

impl Role {
    /// The name used in certificates and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Both => "both",
        }
    }

    /// Whether a credential with this role may start sessions.
    pub fn may_coordinate(self) -> bool {
        matches!(self, Role::Coordinator | Role::Both)
    }

    /// Whether a credential with this role may serve a rank.
    pub fn may_serve(self) -> bool {
        matches!(self, Role::Node | Role::Both)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "node" => Ok(Role::Node),
            "both" => Ok(Role::Both),
            o => Err(format!("unknown role `{o}` (coordinator, node, both)")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The role a certificate (DER) carries: `Ok(None)` for a certificate issued before
/// roles existed (no `tpi-role=` OU), an error for one that does not parse or names an
/// unknown role.
pub fn certificate_role(der: &[u8]) -> Result<Option<Role>, NetError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| tls_err("parsing the peer certificate", e))?;
    let mut role = None;
    for ou in cert.subject().iter_organizational_unit() {
        let v = ou
            .as_str()
            .map_err(|e| tls_err("reading the certificate's OU", e))?;
        if let Some(r) = v.strip_prefix(ROLE_PREFIX) {
            if role.is_some() {
                return Err(NetError::Tls("the certificate names two roles".into()));
            }
            role = Some(r.parse::<Role>().map_err(NetError::Tls)?);
        }
    }
    Ok(role)
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Tls(format!("{what}: {e}"))
}

fn ca_params() -> Result<CertificateParams, NetError> {
    let mut p =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_err("CA params", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// A cluster certificate authority: its certificate and private key (PEM).
///
/// Keep the key on the machine that issues credentials (the coordinator); workers only
/// need a [`Credential`].
#[derive(Clone)]
pub struct CaBundle {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key (PKCS#8), PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CaBundle {
    /// Generates a fresh CA (ECDSA P-256, self-signed, CN "tpi cluster CA").
    pub fn generate() -> Result<CaBundle, NetError> {
        let key = KeyPair::generate().map_err(|e| tls_err("CA key generation", e))?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(|e| tls_err("CA self-signing", e))?;
        Ok(CaBundle {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a leaf credential named `name` (its CN) with `role` (its OU), valid for
    /// client and server auth (nodes also connect to each other for data links), with
    /// [`SERVER_NAME`] as its DNS SAN, signed by this CA.
    ///
    /// Only CAs made by [`CaBundle::generate`] are supported (the issuer name is rebuilt
    /// from the fixed CA parameters; the signature comes from `key_pem`).
    pub fn issue(&self, name: &str, role: Role) -> Result<Credential, NetError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|e| tls_err("CA key", e))?;
        let ca_cert = ca_params()?
            .self_signed(&ca_key)
            .map_err(|e| tls_err("CA rebuild", e))?;
        let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| tls_err("leaf params", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(
            DnType::OrganizationalUnitName,
            format!("{ROLE_PREFIX}{}", role.name()),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| tls_err("leaf key generation", e))?;
        let cert = p
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(|e| tls_err("leaf signing", e))?;
        Ok(Credential {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// One process's TLS identity: the cluster CA certificate it trusts, its own leaf
/// certificate and the leaf's private key (all PEM).
#[derive(Clone)]
pub struct Credential {
    /// The cluster CA certificate (trust anchor), PEM.
    pub ca_pem: String,
    /// This process's leaf certificate, PEM.
    pub cert_pem: String,
    /// This process's private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// Generates a fresh cluster CA (same as [`CaBundle::generate`]).
    pub fn generate_ca() -> Result<CaBundle, NetError> {
        CaBundle::generate()
    }

    /// A throwaway CA plus one credential issued by it, for `--local-cluster` runs and
    /// tests (all in-process ranks can share the credential or get their own via
    /// [`CaBundle::issue`]).
    pub fn ephemeral_cluster() -> Result<(CaBundle, Credential), NetError> {
        let ca = CaBundle::generate()?;
        let cred = ca.issue("tpi-local", Role::Both)?;
        Ok((ca, cred))
    }

    /// The role this credential's certificate carries (None: issued before roles).
    pub fn role(&self) -> Result<Option<Role>, NetError> {
        let chain = self.parts()?.chain;
        certificate_role(&chain[0])
    }

    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir` (created if missing); the key
    /// file is created with mode 0600 on Unix.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.pem"), &self.ca_pem)?;
        std::fs::write(dir.join("cert.pem"), &self.cert_pem)?;
        let key_path = dir.join("key.pem");
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&key_path)?;
        #[cfg(unix)]
        {
            // `mode` only applies on creation; tighten a pre-existing file too.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        std::io::Write::write_all(&mut f, self.key_pem.as_bytes())?;
        Ok(())
    }

    /// Reads a credential written by [`Credential::save`] and checks that it parses.
    pub fn load(dir: &Path) -> Result<Credential, NetError> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| NetError::Tls(format!("reading {}: {e}", dir.join(f).display())))
        };
        let cred = Credential {
            ca_pem: read("ca.pem")?,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
        };
        cred.parts()?;
        Ok(cred)
    }

    fn parts(&self) -> Result<Parts, NetError> {
        let ca: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.ca_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err("parsing ca.pem", e))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err("parsing cert.pem", e))?;
        if ca.is_empty() || chain.is_empty() {
            return Err(NetError::Tls(
                "ca.pem or cert.pem holds no certificate".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| tls_err("parsing key.pem", e))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| tls_err("adding the cluster CA", e))?;
        }
        Ok(Parts {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }
}

struct Parts {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quinn server config: TLS 1.3, requires a client certificate chained to the cluster
/// CA, tuned with `TransportOptions::default()`.
pub fn server_config(cred: &Credential) -> Result<quinn::ServerConfig, NetError> {
    server_config_with(cred, &TransportOptions::default())
}

/// [`server_config`] with explicit transport options.
pub fn server_config_with(
    cred: &Credential,
    opts: &TransportOptions,
) -> Result<quinn::ServerConfig, NetError> {
    let parts = cred.parts()?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        parts.roots.clone(),
        provider(),
    )
    .build()
    .map_err(|e| tls_err("client verifier", e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parts.chain, parts.key)
        .map_err(|e| tls_err("server certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| tls_err("QUIC server TLS", e))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.transport_config()));
    Ok(cfg)
}

/// A quinn client config: TLS 1.3, verifies the server against the cluster CA under the
/// name [`SERVER_NAME`] and presents this credential as the client certificate.
pub fn client_config(cred: &Credential) -> Result<quinn::ClientConfig, NetError> {
    client_config_with(cred, &TransportOptions::default())
}

/// [`client_config`] with explicit transport options.
pub fn client_config_with(
    cred: &Credential,
    opts: &TransportOptions,
) -> Result<quinn::ClientConfig, NetError> {
    let parts = cred.parts()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err("TLS versions", e))?
        .with_root_certificates(parts.roots)
        .with_client_auth_cert(parts.chain, parts.key)
        .map_err(|e| tls_err("client certificate", e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| tls_err("QUIC client TLS", e))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(opts.transport_config()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_save_load() {
        let (ca, cred) = Credential::ephemeral_cluster().unwrap();
        let other = ca.issue("rank-3", Role::Node).unwrap();
        assert_eq!(other.role().unwrap(), Some(Role::Node));
        assert_eq!(cred.role().unwrap(), Some(Role::Both));
        assert_eq!(
            ca.issue("c", Role::Coordinator).unwrap().role().unwrap(),
            Some(Role::Coordinator)
        );
        assert_eq!(other.ca_pem, cred.ca_pem);
        let dir = std::env::temp_dir().join(format!("tpi-net-tls-{}", std::process::id()));
        other.save(&dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let back = Credential::load(&dir).unwrap();
        assert_eq!(back.cert_pem, other.cert_pem);
        assert_eq!(back.key_pem, other.key_pem);
        server_config(&back).unwrap();
        client_config(&back).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn roles_parse_and_say_what_they_allow() {
        for r in [Role::Coordinator, Role::Node, Role::Both] {
            assert_eq!(r.name().parse::<Role>().unwrap(), r);
        }
        assert!("admin".parse::<Role>().is_err());
        assert!(Role::Coordinator.may_coordinate() && !Role::Coordinator.may_serve());
        assert!(!Role::Node.may_coordinate() && Role::Node.may_serve());
        assert!(Role::Both.may_coordinate() && Role::Both.may_serve());
        // A certificate from before roles (no OU) has none.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(certificate_role(cert.der()).unwrap(), None);
        assert!(certificate_role(b"not a certificate").is_err());
    }

    #[test]
    fn load_missing_is_clear() {
        let e = Credential::load(Path::new("/nonexistent/tpi")).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }
}
