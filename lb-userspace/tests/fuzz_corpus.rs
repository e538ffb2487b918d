//! The checked-in fuzz corpora (`fuzz/corpus/<target>/`), replayed through the same entry points
//! the cargo-fuzz targets call (`lb_userspace::fuzz`), as ordinary tests: no sanitizer build, no
//! libFuzzer. Every input is also cut at up to 64 places, so each seed stands for its truncations
//! too. An input that once broke a parser stays in its folder for good.

use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_target_has_a_corpus_and_every_corpus_a_target() {
    let names: Vec<&str> = lb_userspace::fuzz::TARGETS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    for name in &names {
        let dir = corpus_root().join(name);
        let n = std::fs::read_dir(&dir)
            .map(|d| d.count())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(n > 0, "{}: empty", dir.display());
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../fuzz/fuzz_targets/{name}.rs"))
                .is_file(),
            "no cargo-fuzz target for {name}"
        );
    }
    for entry in std::fs::read_dir(corpus_root()).expect("fuzz/corpus") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            names.contains(&name.as_ref()),
            "fuzz/corpus/{name} has no entry point"
        );
    }
}

#[test]
fn the_corpora_and_their_truncations_break_no_parser() {
    let mut failures = Vec::new();
    let mut inputs = 0;
    for (name, entry) in lb_userspace::fuzz::TARGETS {
        let dir = corpus_root().join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("corpus")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).expect("read");
            let step = (data.len() / 64).max(1);
            let cuts = (0..data.len()).step_by(step).chain([data.len()]);
            for cut in cuts {
                inputs += 1;
                let input = data[..cut].to_vec();
                if let Err(e) = std::panic::catch_unwind(move || entry(&input)) {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{name}: {} cut at {cut}: {why}", file.display()));
                }
            }
        }
    }
    eprintln!("fuzz corpora: {inputs} inputs replayed");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
