//! The file provider on a real directory with a real inotify watch: edit, atomic rename,
//! truncated write, invalid file, deletion — each with the expected snapshot or error.
#![allow(clippy::disallowed_methods)] // tests drive real time and real processes

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use lb_userspace::{
    model::instance::Services,
    model::FileProviderSpec,
    sources::{file, Event},
};
use tokio::sync::mpsc;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn services_toml(instances: &[(&str, u32)]) -> String {
    let mut s = String::from("[[service]]\nname = \"web\"\n");
    for (addr, w) in instances {
        s += &format!("\n[[service.instance]]\naddress = \"{addr}\"\nport = 80\nweight = {w}\n");
    }
    s
}

/// Waits for the provider to settle after a change (bounded): the last snapshot sent and every
/// error seen on the way.
async fn next_snapshot(rx: &mut mpsc::Receiver<Event>) -> (Services, Vec<String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (mut last, mut errors) = (None, Vec::new());
    loop {
        let quiet = tokio::time::Instant::now() + Duration::from_millis(300);
        let until = if last.is_some() {
            quiet.min(deadline + Duration::from_secs(5))
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(Event::Snapshot { services, .. })) => last = Some(services),
            Ok(Some(Event::Error { error, .. })) => errors.push(error),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    (last.expect("no snapshot within 5 s"), errors)
}

fn weights(s: &Services) -> Vec<(String, u32)> {
    s.get("web")
        .map(|m| {
            m.values()
                .map(|i| (i.address.to_string(), i.weight))
                .collect()
        })
        .unwrap_or_default()
}

fn write_atomically(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write tmp");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

#[tokio::test]
async fn watched_directory_follows_edits_and_rejects_bad_files() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("lb-file-provider-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("dir");
    let a = dir.0.join("a.toml");
    std::fs::write(&a, services_toml(&[("10.0.0.1", 1), ("10.0.0.2", 1)])).expect("write");

    let (tx, mut rx) = mpsc::channel(64);
    let spec = FileProviderSpec {
        path: dir.0.clone(),
        debounce: Duration::from_millis(50),
    };
    let task = tokio::spawn(file::run(spec, tx));

    let (s, e) = next_snapshot(&mut rx).await;
    assert_eq!(
        weights(&s),
        vec![("10.0.0.1".into(), 1), ("10.0.0.2".into(), 1)]
    );
    assert!(e.is_empty());

    // An in-place edit.
    std::fs::write(&a, services_toml(&[("10.0.0.1", 3), ("10.0.0.2", 1)])).expect("edit");
    let (s, _) = next_snapshot(&mut rx).await;
    assert_eq!(weights(&s)[0], ("10.0.0.1".into(), 3), "edit seen");

    // An atomic rename over the file (what deploy tools and editors do).
    write_atomically(
        &dir.0,
        "a.toml",
        &services_toml(&[("10.0.0.1", 3), ("10.0.0.3", 1)]),
    );
    let (s, _) = next_snapshot(&mut rx).await;
    assert_eq!(
        weights(&s),
        vec![("10.0.0.1".into(), 3), ("10.0.0.3".into(), 1)],
        "rename seen"
    );

    // An empty file is a write in progress, not "no services": the last good content stays.
    std::fs::write(&a, "").expect("empty");
    let (s, _) = next_snapshot(&mut rx).await;
    assert_eq!(weights(&s).len(), 2, "an empty file changes nothing");

    // A truncated write: the file's last good content stays, with an error naming the file.
    let full = services_toml(&[("10.0.0.1", 3), ("10.0.0.4", 1)]);
    let cut = full.rfind("10.0.0.4").expect("in file") + 4; // inside the quoted address
    std::fs::write(&a, &full[..cut]).expect("truncate");
    let (s, e) = next_snapshot(&mut rx).await;
    assert_eq!(
        weights(&s),
        vec![("10.0.0.1".into(), 3), ("10.0.0.3".into(), 1)],
        "truncated file changes nothing"
    );
    assert!(
        e.iter().any(|e| e.contains("a.toml")),
        "error names the file: {e:?}"
    );

    // An invalid second file (YAML this time) is rejected with its line; the first file still counts.
    std::fs::write(
        dir.0.join("b.yaml"),
        "services:\n  - name: web\n    instances:\n      - address: 10.0.0.x\n",
    )
    .expect("b");
    let (s, e) = next_snapshot(&mut rx).await;
    assert_eq!(weights(&s).len(), 2);
    assert!(
        e.iter().any(|e| e.contains("b.yaml:4")),
        "error names file and line: {e:?}"
    );

    // Fixing both files brings both in.
    std::fs::write(&a, &full).expect("fix a");
    std::fs::write(
        dir.0.join("b.yaml"),
        "services:\n  - name: web\n    instances:\n      - address: 10.0.0.5\n        port: 80\n",
    )
    .expect("fix b");
    let (s, _) = next_snapshot(&mut rx).await;
    assert_eq!(
        weights(&s),
        vec![
            ("10.0.0.1".into(), 3),
            ("10.0.0.4".into(), 1),
            ("10.0.0.5".into(), 1)
        ]
    );

    // Deleting a file removes what it provided.
    std::fs::remove_file(dir.0.join("b.yaml")).expect("rm");
    let (s, _) = next_snapshot(&mut rx).await;
    assert_eq!(weights(&s).len(), 2);
    task.abort();
}
