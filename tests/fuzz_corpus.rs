//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`) and the seed inputs
//! through the harnesses the fuzz targets use (`vmm::fuzzing`), on stable Rust: any panic
//! (a property a harness checks, or a crash) fails the test. See docs/TESTING.md,
//! "Fuzzing".

use std::fs;
use std::path::{Path, PathBuf};

use vmm::fuzzing::{TARGETS, seeds::seeds};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(rd) => rd.map(|e| e.expect("corpus entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

#[test]
fn every_corpus_file_replays_without_a_failure() {
    let mut total = 0;
    for (target, harness) in TARGETS {
        let files = corpus_files(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
        for f in &files {
            let data = fs::read(f).expect("corpus file reads");
            let r = std::panic::catch_unwind(|| harness(&data));
            assert!(r.is_ok(), "{target}: {} fails its harness", f.display());
        }
        total += files.len();
    }
    println!("{total} corpus files replayed");
}

#[test]
fn seeds_replay_without_a_failure() {
    let seeds = seeds(&root().join("tests/fixtures")).expect("fixtures read");
    for (target, _) in TARGETS {
        assert!(
            seeds.iter().any(|s| s.target == *target),
            "no seed for {target}"
        );
    }
    for s in &seeds {
        let harness = TARGETS
            .iter()
            .find(|t| t.0 == s.target)
            .expect("a target")
            .1;
        let r = std::panic::catch_unwind(|| harness(&s.data));
        assert!(r.is_ok(), "{}: seed {} fails its harness", s.target, s.name);
    }
}

/// Writes the seeds into `fuzz/corpus/<target>/seed-<name>` (run by hand:
/// `cargo test --test fuzz_corpus -- --ignored write_fuzz_seeds`).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    for s in seeds(&root().join("tests/fixtures")).expect("fixtures read") {
        let dir = root().join("fuzz/corpus").join(s.target);
        fs::create_dir_all(&dir).expect("corpus dir");
        fs::write(dir.join(format!("seed-{}", s.name)), &s.data).expect("seed written");
    }
    assert!(Path::new(&root().join("fuzz/corpus")).is_dir());
}
