//! `export` streams: it reads, converts and writes one tensor at a time, so its memory does not
//! grow with the model. Its own test binary (one process, one test) so that the process's
//! anonymous memory is the export's: a thread samples `RssAnon` (/proc/self/status) while a
//! checkpoint four times larger in f32 than the cap below is exported.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use dsa_train::config::IndexerDefaults;
use dsa_train::export::{export_hf_checkpoint, ExportOptions};

/// Anonymous resident memory of this process in bytes (Linux).
fn rss_anon() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/self/status");
    kb * 1024
}

#[test]
fn export_holds_one_tensor_at_a_time_not_the_model() {
    let dir = tempfile::tempdir().unwrap();
    // The mini model's shapes with 8 layers and a 8K vocabulary: 81M parameters, the largest
    // tensor (embedding, head) 4.2M. Written by the CLI in a child process.
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/mini/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    config["vocab_size"] = 8192.into();
    config["num_hidden_layers"] = 8.into();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let base = dir.path().join("base");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_dsa-train"))
        .args(["init", "--config"])
        .arg(&config_path)
        .arg("--output")
        .arg(&base)
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = dsa_train::config::ModelConfig::from_dir(&base, &IndexerDefaults::default()).unwrap();
    let f32_bytes: u64 = dsa_train::weights::model_weights(&cfg, false)
        .iter()
        .map(|s| 4 * s.shape.iter().product::<usize>() as u64)
        .sum();
    let largest: u64 = dsa_train::weights::model_weights(&cfg, false)
        .iter()
        .map(|s| 4 * s.shape.iter().product::<usize>() as u64)
        .max()
        .unwrap();
    let cap = f32_bytes / 4;
    assert!(
        largest * 3 < cap,
        "the test model's largest tensor must be small against the cap"
    );

    let before = rss_anon();
    let (stop, peak) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(before)),
    );
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_anon(), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let out = dir.path().join("exported");
    let opts = ExportOptions {
        fp8: false,
        max_shard_bytes: 32 << 20,
    };
    export_hf_checkpoint(&base, &out, &IndexerDefaults::default(), 0, &opts).unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let grew = peak.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "export of {:.0} MB (f32) grew anonymous memory by {:.1} MB at most (cap {:.0} MB, largest tensor {:.1} MB)",
        f32_bytes as f64 / 1e6,
        grew as f64 / 1e6,
        cap as f64 / 1e6,
        largest as f64 / 1e6
    );
    assert!(
        grew < cap,
        "the export held {grew} bytes of anonymous memory at once; the model is {f32_bytes} bytes in f32"
    );
    // The export is complete: every tensor of the model and its shards.
    let ckpt = dsa_train::checkpoint::Checkpoint::open(&out).unwrap();
    for s in dsa_train::weights::model_weights(&cfg, false) {
        assert!(ckpt.contains(&s.name), "{} missing from the export", s.name);
    }
}
