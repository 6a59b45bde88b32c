//! The node's session protocol, driven in-process over real loopback QUIC: a node server
//! (`tpi_node::worker::serve`) on 127.0.0.1:0 and a raw client speaking the control
//! stream by hand. Covers the refusals (protocol version, plan identity, out-of-order
//! messages) and hostile input (garbage bytes, a 4 GiB frame header): each ends only the
//! session that sent it, and the server goes on serving the next one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tpi_node::model::{ModelFiles, SplitPlan};
use tpi_node::net::driven::Driven;
use tpi_node::net::frame::{encode_header, FrameKind};
use tpi_node::net::wire::MAX_CONTROL;
use tpi_node::net::wire::PROTOCOL_VERSION;
use tpi_node::net::{
    Algo, CaBundle, Connection, Credential, Endpoint, NetError, Role, Stream, TransportOptions,
    WireDType,
};
use tpi_node::proto::{FromNode, Setup, ToNode, CONTROL_STREAM_TAG};
use tpi_node::store::{write_shard, Manifest, Quant};
use tpi_node::worker::{bind, serve, NodeOptions};

/// Limit on any single wait for the node.
const T: Duration = Duration::from_secs(5);

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tpi-node-session-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node server running in this process, plus a client credential from the same CA.
struct TestNode {
    addr: SocketAddr,
    ep: Endpoint,
    client_cred: Credential,
    _ca: CaBundle,
    _data: TempDir,
}

impl TestNode {
    async fn start() -> TestNode {
        let (ca, node_cred) = Credential::ephemeral_cluster().expect("ephemeral cluster");
        let client_cred = ca
            .issue("test-coordinator", tpi_node::net::Role::Coordinator)
            .expect("issue client credential");
        let data = TempDir::new("data");
        let opts = NodeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            threads: 1,
            credential: node_cred,
            transport: TransportOptions::default(),
            data_dir: data.0.clone(),
            shard_dir: None,
            window: None,
            mem_budget: None,
            link: None,
        };
        let (ep, addr) = bind(&opts).expect("bind node");
        // The test's own multi-threaded runtime drives IO; session threads wait through it.
        let net = std::sync::Arc::new(Driven::attach(tokio::runtime::Handle::current()));
        tokio::spawn(serve(ep.clone(), opts, net));
        TestNode {
            addr,
            ep,
            client_cred,
            _ca: ca,
            _data: data,
        }
    }

    /// Dials the node and opens a control stream.
    async fn open(&self) -> (Endpoint, Connection, Stream) {
        let cep = Endpoint::client(&self.client_cred).expect("client endpoint");
        let conn = cep.connect(self.addr, T).await.expect("connect to node");
        let s = conn
            .open_stream(CONTROL_STREAM_TAG)
            .await
            .expect("open control stream");
        (cep, conn, s)
    }

    /// Opens a session that the node accepts (Hello → Welcome). Retries briefly while the
    /// node still reports the previous session as running (it ends asynchronously).
    async fn open_welcomed(&self) -> (Endpoint, Connection, Stream) {
        let t0 = Instant::now();
        loop {
            let (cep, conn, mut s) = self.open().await;
            s.send_msg(&ToNode::Hello {
                version: PROTOCOL_VERSION,
            })
            .await
            .ok(); // a busy node may refuse (and close) before reading it
            match recv(&mut s).await {
                Ok(FromNode::Welcome {
                    version,
                    threads,
                    isa,
                }) => {
                    assert_eq!(version, PROTOCOL_VERSION);
                    assert_eq!(threads, 1);
                    // The kernel path the node computes with, as the coordinator reads it.
                    assert_eq!(isa, tpi_kernels::active_isa().name());
                    return (cep, conn, s);
                }
                Ok(FromNode::Refused { reason })
                    if reason.contains("busy") && t0.elapsed() < 2 * T =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The node lingers (up to 2 s) on a failed session's connection before
                // it takes the next one; a refusal may also arrive as a bare close.
                Err(_) if t0.elapsed() < 2 * T => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("a valid Hello was not welcomed: {other:?}"),
            }
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.ep.close("test over");
    }
}

async fn recv(s: &mut Stream) -> Result<FromNode, NetError> {
    match tokio::time::timeout(T, s.recv_msg::<FromNode>(MAX_CONTROL)).await {
        Ok(r) => r,
        Err(_) => panic!("the node neither answered nor ended the session within {T:?}"),
    }
}

/// Rank 1's real shard manifest of a fixture (gqa12_f32: 12 heads, 4 KV heads) split
/// over 2 ranks.
fn fixture_manifest(tmp: &TempDir) -> Manifest {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/fixtures/models/gqa12_f32");
    let files = ModelFiles::open(&p).expect("open fixture");
    let plan = SplitPlan::new(&files.config, &[1.0, 1.0]).expect("plan");
    write_shard(
        &files,
        &plan,
        1,
        Quant::Keep,
        tpi_node::store::default_layout(),
        &tmp.0.join("shard"),
    )
    .expect("write shard")
}

fn setup_for(m: &Manifest, plan_id: String) -> Setup {
    Setup {
        rank: 1,
        world: 2,
        model_id: m.model_id.clone(),
        plan_id,
        manifest: m.clone(),
        algo: Algo::Star.into(),
        dtype: WireDType::F32,
        addrs: vec![None, Some("127.0.0.1:9".parse().unwrap())],
        kv_dtype: Default::default(),
        capacity: 16,
    }
}

/// Peak resident memory of this process, in KiB (Linux; 0 elsewhere).
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
fn garbage(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// After the node ended a session on an error, the client sees the stream or connection
/// end (not a hang).
async fn expect_session_ended(s: &mut Stream, what: &str) -> NetError {
    match recv(s).await {
        Err(e) => e,
        Ok(m) => panic!("after {what} the node answered {m:?} instead of ending the session"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_another_version_is_refused_naming_both() {
    let node = TestNode::start().await;
    let (_cep, _conn, mut s) = node.open().await;
    s.send_msg(&ToNode::Hello { version: 99 }).await.unwrap();
    match recv(&mut s).await {
        Ok(FromNode::Refused { reason }) => {
            assert!(
                reason.contains("99") && reason.contains(&PROTOCOL_VERSION.to_string()),
                "the refusal should name both versions (99 and {PROTOCOL_VERSION}): {reason}"
            );
        }
        other => panic!("expected Refused for version 99, got {other:?}"),
    }
    // The node still serves a correct coordinator afterwards.
    let _ok = node.open_welcomed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_with_wrong_plan_id_is_refused_naming_the_plan() {
    let node = TestNode::start().await;
    let tmp = TempDir::new("manifest");
    let m = fixture_manifest(&tmp);
    let real_id = m.plan_id.clone();
    assert_eq!(real_id, m.plan.id());
    let bogus = "0123456789abcdef".to_string();
    assert_ne!(real_id, bogus);

    // The session claims another plan than its manifest's.
    let (_cep, _conn, mut s) = node.open_welcomed().await;
    s.send_msg(&ToNode::Setup(Box::new(setup_for(&m, bogus.clone()))))
        .await
        .unwrap();
    match recv(&mut s).await {
        Ok(FromNode::Refused { reason }) => {
            assert!(
                reason.contains("plan identity")
                    && reason.contains(&bogus)
                    && reason.contains(&real_id),
                "the refusal should name the plan identity (claimed {bogus}, actual {real_id}): {reason}"
            );
        }
        other => panic!("expected Refused for a wrong plan_id, got {other:?}"),
    }
    drop(s);

    // The manifest's plan does not hash to the plan id it (and the session) claim.
    let mut forged = m.clone();
    forged.plan_id = bogus.clone();
    let (_cep, _conn, mut s) = node.open_welcomed().await;
    s.send_msg(&ToNode::Setup(Box::new(setup_for(&forged, bogus.clone()))))
        .await
        .unwrap();
    match recv(&mut s).await {
        Ok(FromNode::Refused { reason }) => {
            assert!(
                reason.contains("plan") && reason.contains("id"),
                "the refusal should say the plan identity is wrong: {reason}"
            );
        }
        other => panic!("expected Refused for a plan that does not hash to its id, got {other:?}"),
    }
    drop(s);

    // A matching Setup passes validation: the node (empty cache) asks for blocks.
    let (_cep2, _conn2, mut s2) = node.open_welcomed().await;
    s2.send_msg(&ToNode::Setup(Box::new(setup_for(&m, real_id))))
        .await
        .unwrap();
    match recv(&mut s2).await {
        Ok(FromNode::NeedBlocks(needs)) => assert!(
            !needs.is_empty(),
            "a node with an empty cache should need blocks"
        ),
        other => panic!("a matching Setup should be answered with NeedBlocks, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frame_ends_session_and_node_keeps_serving() {
    let node = TestNode::start().await;
    for seed in [1u64, 0x9e3779b97f4a7c15, 42] {
        let (_cep, _conn, mut s) = node.open().await;
        let bytes = garbage(64, seed);
        s.send.write_all(&bytes).await.expect("write garbage");
        let t0 = Instant::now();
        let e = expect_session_ended(&mut s, "64 random bytes").await;
        eprintln!(
            "garbage (seed {seed:#x}) ended the session in {:?}: {e}",
            t0.elapsed()
        );
        // Next session works.
        let (_c, _k, mut ok) = node.open_welcomed().await;
        ok.send_msg(&ToNode::End).await.unwrap();
    }
    // A well-formed frame header with garbage (non-bincode) payload.
    let (_cep, _conn, mut s) = node.open().await;
    let payload = garbage(100, 7);
    let hdr = encode_header(FrameKind::Control, payload.len()).unwrap();
    s.send.write_all(&hdr).await.unwrap();
    let _ = s.send.write_all(&payload).await;
    let e = expect_session_ended(&mut s, "a control frame of garbage").await;
    eprintln!("garbage control payload ended the session: {e}");
    let _ok = node.open_welcomed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gib_frame_header_is_refused_without_allocating() {
    let node = TestNode::start().await;
    let hwm0 = vm_hwm_kib();
    // The largest length a frame header can announce: 4 GiB - 1.
    let (_cep, _conn, mut s) = node.open().await;
    let hdr = encode_header(FrameKind::Control, u32::MAX as usize).unwrap();
    assert_eq!(&hdr[..4], &[0xff, 0xff, 0xff, 0xff]);
    s.send.write_all(&hdr).await.unwrap();
    // The node may have closed already: the padding need not arrive.
    let _ = s.send.write_all(&[0u8; 1024]).await;
    let t0 = Instant::now();
    let e = expect_session_ended(&mut s, "a 4 GiB Control frame header").await;
    eprintln!("4 GiB header ended the session in {:?}: {e}", t0.elapsed());

    // The same inside a welcomed session, as a Tensor frame where the Setup should be.
    let (_cep, _conn, mut s) = node.open_welcomed().await;
    let hdr = encode_header(FrameKind::Tensor, u32::MAX as usize).unwrap();
    s.send.write_all(&hdr).await.unwrap();
    let e = expect_session_ended(&mut s, "a 4 GiB Tensor frame header").await;
    eprintln!("4 GiB tensor header ended the session: {e}");

    let hwm1 = vm_hwm_kib();
    assert!(
        hwm1 < hwm0 + 512 * 1024,
        "peak RSS grew from {hwm0} KiB to {hwm1} KiB: the node allocated for a hostile length"
    );
    let (_c, _k, mut ok) = node.open_welcomed().await;
    ok.send_msg(&ToNode::End).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_before_setup_is_refused() {
    let node = TestNode::start().await;
    let (_cep, _conn, mut s) = node.open_welcomed().await;
    s.send_msg(&ToNode::Step { start: 0, n: 1 }).await.unwrap();
    // Also send the hidden-state frame a Step carries, as a real coordinator would.
    let hdr = encode_header(FrameKind::Tensor, 4 * 96).unwrap();
    let _ = s.send.write_all(&hdr).await;
    let _ = s.send.write_all(&[0u8; 4 * 96]).await;
    let t0 = Instant::now();
    let r = recv(&mut s).await;
    eprintln!("Step before Setup answered in {:?}: {r:?}", t0.elapsed());
    match r {
        Ok(FromNode::Refused { reason }) | Ok(FromNode::Error { msg: reason }) => {
            assert!(
                reason.contains("Setup"),
                "the refusal should say a Setup was expected: {reason}"
            );
        }
        other => {
            panic!("a Step before Setup should be refused with a message saying why; got {other:?}")
        }
    }
    let _ok = node.open_welcomed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_instead_of_hello_is_refused() {
    let node = TestNode::start().await;
    let (_cep, _conn, mut s) = node.open().await;
    s.send_msg(&ToNode::Step { start: 0, n: 1 }).await.unwrap();
    let r = recv(&mut s).await;
    eprintln!("Step instead of Hello: {r:?}");
    match r {
        Ok(FromNode::Refused { reason }) | Ok(FromNode::Error { msg: reason }) => {
            assert!(reason.contains("Hello"), "{reason}");
        }
        // Ending the session without a word is acceptable here: nothing was negotiated.
        Err(_) => {}
        Ok(other) => panic!("unexpected answer to a Step instead of Hello: {other:?}"),
    }
    let _ok = node.open_welcomed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_session_while_busy_is_refused() {
    let node = TestNode::start().await;
    let (_cep, _conn, _s) = node.open_welcomed().await;
    let (_cep2, _conn2, mut s2) = node.open().await;
    s2.send_msg(&ToNode::Hello {
        version: PROTOCOL_VERSION,
    })
    .await
    .ok(); // the node may refuse (and close) before reading it
    match recv(&mut s2).await {
        Ok(FromNode::Refused { reason }) => assert!(reason.contains("busy"), "{reason}"),
        other => panic!("a second concurrent session should be refused as busy, got {other:?}"),
    }
}

/// Security: a client whose certificate comes from another cluster's CA cannot start a
/// session or send work (no Welcome, no Step accepted), and the node goes on serving
/// its own cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_the_cluster_credential_gets_nothing() {
    let node = TestNode::start().await;
    let (_other_ca, stranger) = Credential::ephemeral_cluster().expect("another cluster");
    let cep = Endpoint::client(&stranger).expect("client endpoint");
    // The server's certificate is not from the stranger's CA either: the client refuses it,
    // or (TLS 1.3 checks the client certificate last) the node refuses the client.
    let got = match cep.connect(node.addr, T).await {
        Err(e) => format!("connect refused: {e}"),
        Ok(conn) => match conn.open_stream(CONTROL_STREAM_TAG).await {
            Err(e) => format!("stream refused: {e}"),
            Ok(mut s) => {
                let _ = s
                    .send_msg(&ToNode::Hello {
                        version: PROTOCOL_VERSION,
                    })
                    .await;
                let _ = s.send_msg(&ToNode::Step { start: 0, n: 1 }).await;
                match tokio::time::timeout(T, recv(&mut s)).await {
                    Ok(Ok(m)) => panic!("a stranger got an answer from the node: {m:?}"),
                    Ok(Err(e)) => format!("session refused: {e}"),
                    Err(_) => panic!("no error within {T:?}"),
                }
            }
        },
    };
    assert!(
        got.to_lowercase().contains("tls") || got.to_lowercase().contains("certificate"),
        "the refusal should be a TLS/certificate failure: {got}"
    );
    // A client with a cluster-issued certificate that trusts another CA cannot connect either.
    let mixed = Credential {
        ca_pem: stranger.ca_pem.clone(),
        ..node.client_cred.clone()
    };
    let cep = Endpoint::client(&mixed).expect("client endpoint");
    assert!(
        cep.connect(node.addr, T).await.is_err(),
        "a client that does not trust the cluster CA must not connect"
    );
    let _ok = node.open_welcomed().await;
}

#[test]
fn unknown_or_impossible_tensor_layouts_are_clear_errors() {
    let tmp = TempDir::new("layout");
    let m = fixture_manifest(&tmp);
    assert!(m.check().is_ok());
    let mut bad = m.clone();
    bad.blocks[0].tensors[0].layout = "zigzag".into();
    let e = bad.check().expect_err("unknown layout accepted");
    assert!(e.contains("unknown layout `zigzag`"), "{e}");
    // A packed f32 tensor (the fixture's norms) cannot exist: reading it is an error.
    let dir = tmp.0.join("shard");
    let mut m2 = m.clone();
    m2.blocks[0].tensors[0].layout = "packed".into();
    tpi_node::store::shard::save_manifest(&dir, &m2).expect("save manifest");
    let shard = tpi_node::store::Shard::open(&dir).expect("open shard");
    let t = &m2.blocks[0].tensors[0];
    let e = shard
        .weight(t.role, t.layer as usize)
        .expect_err("packed f32 accepted");
    assert!(e.to_string().contains("cannot be stored packed"), "{e}");
}

/// A leaf signed by `ca` the way credentials were issued before roles: no `tpi-role` OU.
fn legacy_credential(ca: &CaBundle) -> Credential {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::from_pem(&ca.key_pem).unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "tpi cluster CA");
    cp.distinguished_name = dn;
    cp.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    cp.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = cp.self_signed(&ca_key).unwrap();
    let mut p = CertificateParams::new(vec![tpi_node::net::tls::SERVER_NAME.to_string()]).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "old-coordinator");
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Credential {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_may_start_a_session() {
    let node = TestNode::start().await;
    let hello = |cred: Credential| {
        let addr = node.addr;
        async move {
            let cep = Endpoint::client(&cred).expect("client endpoint");
            let conn = cep.connect(addr, T).await.expect("connect");
            let mut s = conn.open_stream(CONTROL_STREAM_TAG).await.expect("stream");
            let _ = s
                .send_msg(&ToNode::Hello {
                    version: PROTOCOL_VERSION,
                })
                .await;
            let r = recv(&mut s).await;
            (cep, conn, r)
        }
    };
    // Another node's credential is refused, naming its role.
    let other = node._ca.issue("other-node", Role::Node).unwrap();
    match hello(other).await.2 {
        Ok(FromNode::Refused { reason }) => {
            assert!(
                reason.contains("role node") && reason.contains("coordinator"),
                "{reason}"
            )
        }
        other => panic!("a node credential started a session: {other:?}"),
    }
    // A credential from before roles is still welcomed (the node logs a warning).
    let legacy = legacy_credential(&node._ca);
    assert_eq!(legacy.role().unwrap(), None);
    let r = loop {
        let (_cep, _conn, r) = hello(legacy.clone()).await;
        match &r {
            Ok(FromNode::Refused { reason }) if reason.contains("busy") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => break r,
        }
    };
    assert!(
        matches!(r, Ok(FromNode::Welcome { .. })),
        "legacy credential: {r:?}"
    );
}

/// A peer rank may dial this node's data port while the coordinator's Setup is still on its
/// way here: the node keeps that stream for the session about to start (it used to drop it,
/// which closed the peer's connection and failed a ring of 4 ranks about 1 run in 15
/// under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_link_that_arrives_before_the_session_is_kept_for_it() {
    let node = TestNode::start().await;
    let cep = Endpoint::client(&node.client_cred).expect("client endpoint");
    let conn = cep.connect(node.addr, T).await.expect("connect to node");
    let mut s = conn
        .open_stream(tpi_node::net::collective::DATA_STREAM_TAG)
        .await
        .expect("open data stream");
    // QUIC opens a stream lazily: send something so the node sees it.
    s.send_msg(&ToNode::End)
        .await
        .expect("write on the data stream");
    match tokio::time::timeout(Duration::from_millis(700), conn.closed()).await {
        Err(_) => {} // still open: the node holds the stream for the coming session
        Ok(e) => panic!("the node closed an early data link instead of keeping it: {e}"),
    }
}
