//! [`choose`](super::choose) on made-up machines and flags.

use super::*;
use tpi_kernels::DType;

fn cfg() -> ModelConfig {
    crate::planner::tests::cfg(8, 4, 256)
}

fn spec(ranks: Ranks) -> BackendSpec {
    BackendSpec {
        ranks,
        threads: None,
        node_threads: None,
        window: None,
        mem_budget: None,
        ratios: None,
        coordinator_share: 1.0,
        lm_head: Default::default(),
        kv_dtype: Default::default(),
        credential: None,
        algo: Policy::Auto,
        dtype: WireDType::F32,
        quant: Quant::Keep,
        layout: None,
        shards: None,
        link: None,
        topology: None,
    }
}

fn facts() -> Facts {
    Facts {
        cores: 8,
        q4_matrices: false,
        default_layout: Layout::Ggml,
        default_credential: None,
        cache_root: PathBuf::from("/cache"),
    }
}

fn err(s: &BackendSpec, f: &Facts) -> String {
    choose(s, &cfg(), f).unwrap_err().to_string()
}

#[test]
fn alone_reads_the_file_in_place_on_every_core() {
    let c = choose(&spec(Ranks::Alone), &cfg(), &facts()).unwrap();
    assert_eq!(c, Choice::InPlace { threads: 8 });
    let mut s = spec(Ranks::LocalCluster(1));
    s.threads = Some(3);
    assert_eq!(
        choose(&s, &cfg(), &facts()).unwrap(),
        Choice::InPlace { threads: 3 }
    );
}

#[test]
fn a_q4_model_on_a_packed_machine_reads_a_packed_shard_or_the_file() {
    let f = Facts {
        q4_matrices: true,
        default_layout: Layout::Packed,
        ..facts()
    };
    let c = choose(&spec(Ranks::Alone), &cfg(), &f).unwrap();
    assert_eq!(
        c,
        Choice::OneRankShard {
            threads: 8,
            layout: Layout::Packed,
            or_in_place: true
        }
    );
    // An explicit GGML layout reads the file.
    let mut s = spec(Ranks::Alone);
    s.layout = Some(Layout::Ggml);
    assert_eq!(
        choose(&s, &cfg(), &f).unwrap(),
        Choice::InPlace { threads: 8 }
    );
}

#[test]
fn a_window_or_quant_asks_for_a_shard_that_must_be_written() {
    for s in [
        BackendSpec {
            window: Some(2),
            ..spec(Ranks::Alone)
        },
        BackendSpec {
            mem_budget: Some(1 << 30),
            ..spec(Ranks::Alone)
        },
        BackendSpec {
            quant: Quant::To(DType::Q8_0),
            ..spec(Ranks::Alone)
        },
        BackendSpec {
            shards: Some("/s".into()),
            ..spec(Ranks::Alone)
        },
    ] {
        assert_eq!(
            choose(&s, &cfg(), &facts()).unwrap(),
            Choice::OneRankShard {
                threads: 8,
                layout: Layout::Ggml,
                or_in_place: false
            }
        );
    }
}

#[test]
fn a_local_cluster_splits_the_cores_and_passes_the_flags_on() {
    let mut s = spec(Ranks::LocalCluster(4));
    s.window = Some(3);
    s.link = Some("2ms,100mbit".parse().unwrap());
    let Choice::LocalCluster {
        nodes,
        node_threads,
        threads,
        ratios,
        node_args,
        park_waiting,
    } = choose(&s, &cfg(), &facts()).unwrap()
    else {
        panic!("not a local cluster")
    };
    assert_eq!((nodes, node_threads, threads), (3, 2, 2));
    assert!(!park_waiting, "8 threads on 8 cores may spin");
    assert_eq!(ratios, vec![1.0; 4]);
    assert_eq!(&node_args[..2], ["--data-dir", "/cache"]);
    assert!(node_args.windows(2).any(|w| w == ["--window", "3"]));
    assert!(node_args.iter().any(|a| a == "--link"));
    assert_eq!(node_args.last().unwrap(), "--no-mdns");
    // As many ranks as cores: one thread each, unless a flag says otherwise.
    s.ranks = Ranks::LocalCluster(8);
    s.node_threads = Some(5);
    let c = choose(&s, &cfg(), &facts()).unwrap();
    assert!(matches!(
        c,
        Choice::LocalCluster {
            node_threads: 5,
            threads: 1,
            park_waiting: true,
            ..
        }
    ));
    // More ranks than cores (4 on 2): one thread each, and waiting ranks park.
    s.ranks = Ranks::LocalCluster(4);
    s.node_threads = None;
    let two_cores = Facts {
        cores: 2,
        ..facts()
    };
    let c = choose(&s, &cfg(), &two_cores).unwrap();
    assert!(matches!(
        c,
        Choice::LocalCluster {
            node_threads: 1,
            threads: 1,
            park_waiting: true,
            ..
        }
    ));
}

#[test]
fn ratios_are_checked_against_the_ranks_and_the_model() {
    let mut s = spec(Ranks::LocalCluster(2));
    s.ratios = Some(vec![1.0, 2.0, 3.0]);
    assert!(err(&s, &facts()).contains("--ratios has 3 values for 2 ranks"));
    s.ratios = Some(vec![0.0, 0.0]);
    assert!(err(&s, &facts()).contains("--local-cluster 2"));
    s.ratios = Some(vec![1.0]);
    s.ranks = Ranks::Alone;
    assert!(err(&s, &facts()).contains("--ratios needs a cluster"));
    s.ratios = None;
    s.coordinator_share = 0.0;
    s.ranks = Ranks::LocalCluster(3);
    let Choice::LocalCluster { ratios, .. } = choose(&s, &cfg(), &facts()).unwrap() else {
        panic!()
    };
    assert_eq!(ratios, vec![0.0, 1.0, 1.0]);
}

#[test]
fn absurd_counts_are_refused() {
    assert!(err(&spec(Ranks::LocalCluster(0)), &facts()).contains("needs N >= 1"));
    let mut s = spec(Ranks::Alone);
    s.threads = Some(0);
    assert!(err(&s, &facts()).contains("--threads must be at least 1"));
    s.threads = Some(33);
    assert!(err(&s, &facts()).contains("at most 32"));
    s.threads = None;
    s.node_threads = Some(1000);
    assert!(err(&s, &facts()).contains("--node-threads 1000"));
    let s = spec(Ranks::Nodes(vec![" ".into()]));
    assert!(err(&s, &facts()).contains("--nodes lists no address"));
}

#[test]
fn remote_ranks_need_a_credential_given_or_default() {
    let s = spec(Ranks::Nodes(vec!["10.0.0.2:7000".into()]));
    assert!(err(&s, &facts()).contains("--nodes needs the cluster credential"));
    let s = spec(Ranks::Discover(Some(3)));
    assert!(err(&s, &facts()).contains("--nodes auto needs the cluster credential"));
    let f = Facts {
        default_credential: Some("/home/u/.config/tpi/credential".into()),
        ..facts()
    };
    assert_eq!(
        choose(&s, &cfg(), &f).unwrap(),
        Choice::Remote {
            ranks: Ranks::Discover(Some(3)),
            credential: "/home/u/.config/tpi/credential".into(),
            threads: 8
        }
    );
    let mut s = spec(Ranks::Nodes(vec!["a:1".into()]));
    s.credential = Some("/given".into());
    s.threads = Some(2);
    assert_eq!(
        choose(&s, &cfg(), &f).unwrap(),
        Choice::Remote {
            ranks: Ranks::Nodes(vec!["a:1".into()]),
            credential: "/given".into(),
            threads: 2
        }
    );
}
