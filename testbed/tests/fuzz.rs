//! Replays the committed fuzz corpora (`testbed/fuzz/corpus/<target>/`) and a short fresh
//! fuzzing run per target with fixed seeds: no input may panic. The long runs are
//! `tpi-testbed fuzz` (see the README).

use tpi_testbed::fuzz::{corpus_dir, fuzz, read_corpus, run_one, targets};

#[test]
fn seeds_are_valid_inputs() {
    // The seeds must reach the end of each target, or the mutations start from nothing.
    for t in targets() {
        for (i, s) in (t.seeds)().iter().enumerate() {
            let out =
                run_one(&t, s).unwrap_or_else(|p| panic!("{} seed {i} panicked: {p}", t.name));
            if t.name != "wire" && t.name != "http" {
                assert!(out.starts_with("ok"), "{} seed {i}: {out}", t.name);
            }
        }
    }
}

#[test]
fn corpora_replay_without_panics() {
    let mut total = 0;
    for t in targets() {
        let corpus = read_corpus(&corpus_dir(t.name));
        assert!(!corpus.is_empty(), "no committed corpus for {}", t.name);
        for input in &corpus {
            if let Err(p) = run_one(&t, input) {
                panic!(
                    "{}: a corpus input of {} bytes panics: {p}",
                    t.name,
                    input.len()
                );
            }
        }
        total += corpus.len();
    }
    eprintln!("replayed {total} corpus inputs");
}

#[test]
fn a_short_fresh_run_finds_no_crash() {
    for t in targets() {
        let r = fuzz(&t, 3000, 0x7e57, Vec::new(), None, None);
        assert!(
            r.crashes.is_empty(),
            "{}: {} crash(es), first: {}",
            t.name,
            r.crashes.len(),
            r.crashes[0].1
        );
        assert!(
            r.signatures > 1,
            "{}: the mutations found one behaviour only",
            t.name
        );
    }
}
