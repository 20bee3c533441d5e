//! `dsa-train plot`: a PNG of the documented size with both stages drawn, and every bad
//! metrics line reported with its file and line number.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_error, path_str, run_cli};
use dsa_train::plot::{plot_metrics, read_metrics, Stage, PLOT_HEIGHT, PLOT_WIDTH};

const WARMUP_RGB: [u8; 3] = [230, 120, 20];
const SPARSE_RGB: [u8; 3] = [30, 90, 200];
/// Rows above this belong to the heading (whose legend shows both colours in any case).
const HEADING_ROWS: usize = 40;

/// metrics.jsonl lines of a run with `warmup` dense steps followed by `sparse` sparse ones.
fn run_lines(warmup: u64, sparse: u64) -> Vec<String> {
    (1..=warmup + sparse)
        .map(|step| {
            let s = step as f64;
            if step <= warmup {
                serde_json::json!({"step": step, "stage": "warmup", "lm_loss": null, "indexer_kl": 3.0 / s,
                    "lr": 1e-3, "grad_norm": 1.0 + (s * 0.7).sin().abs(), "tokens": step * 4096, "tokens_per_s": 12000.0})
            } else {
                serde_json::json!({"step": step, "stage": "sparse", "lm_loss": 2.0 + 5.0 / s, "indexer_kl": 0.1 + 1.0 / s,
                    "lr": 7.3e-6, "grad_norm": 0.5, "tokens": step * 4096, "tokens_per_s": 9000.0 + s})
            }
            .to_string()
        })
        .collect()
}

fn write_lines(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("metrics.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// (width, height, RGB8 pixels) of a PNG.
fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Pixels of exactly `rgb` below the heading.
fn count_below_heading(pixels: &[u8], width: u32, rgb: [u8; 3]) -> usize {
    pixels
        .chunks_exact(3)
        .skip(HEADING_ROWS * width as usize)
        .filter(|p| **p == rgb)
        .count()
}

#[test]
fn plot_of_a_run_is_a_png_of_the_documented_size_with_both_stages_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_lines(tmp.path(), &run_lines(60, 140));
    let png = tmp.path().join("plot.png");
    plot_metrics(&metrics, &png).unwrap();
    let (w, h, pixels) = decode(&png);
    assert_eq!((w, h), (PLOT_WIDTH, PLOT_HEIGHT));
    let white = pixels
        .chunks_exact(3)
        .filter(|p| *p == [255, 255, 255])
        .count();
    assert!(white < pixels.len() / 3, "the image is blank");
    // Dark text and axes, and curves of both stages in the panels.
    assert!(
        pixels
            .chunks_exact(3)
            .filter(|p| p.iter().all(|c| *c < 60))
            .count()
            > 2000
    );
    assert!(count_below_heading(&pixels, w, WARMUP_RGB) > 1000);
    assert!(count_below_heading(&pixels, w, SPARSE_RGB) > 1000);
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "a temporary file was left behind"
    );
}

#[test]
fn a_warmup_only_run_draws_no_sparse_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_lines(tmp.path(), &run_lines(30, 0));
    let png = tmp.path().join("plot.png");
    plot_metrics(&metrics, &png).unwrap();
    let (w, _, pixels) = decode(&png);
    assert!(count_below_heading(&pixels, w, WARMUP_RGB) > 500);
    assert_eq!(count_below_heading(&pixels, w, SPARSE_RGB), 0);
}

#[test]
fn a_single_step_with_absent_numbers_still_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_lines(
        tmp.path(),
        &[r#"{"step": 0, "stage": "warmup", "indexer_kl": 2.5}"#.to_string()],
    );
    let png = tmp.path().join("plot.png");
    plot_metrics(&metrics, &png).unwrap();
    let (w, h, pixels) = decode(&png);
    assert_eq!((w, h), (PLOT_WIDTH, PLOT_HEIGHT));
    // The one point is drawn as a marker.
    assert!(count_below_heading(&pixels, w, WARMUP_RGB) > 10);
}

#[test]
fn a_step_logged_twice_keeps_its_last_line_and_steps_come_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines = run_lines(3, 3);
    // A run resumed from step 4 logs steps 5 and 6 again.
    lines.push(r#"{"step": 5, "stage": "sparse", "lm_loss": 1.5, "indexer_kl": 0.2}"#.into());
    lines.insert(0, String::new());
    let records = read_metrics(&write_lines(tmp.path(), &lines)).unwrap();
    assert_eq!(
        records.iter().map(|r| r.step).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(records[4].lm_loss, Some(1.5));
    assert_eq!(records[4].lr, None);
    assert_eq!(records[0].lm_loss, None);
    assert_eq!(
        (records[2].stage, records[3].stage),
        (Stage::Warmup, Stage::Sparse)
    );
}

#[test]
fn bad_metrics_lines_are_errors_naming_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"step\": 3, \"stage\": \"sparse\"", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (r#"{"stage": "sparse", "lm_loss": 2.0}"#, "\"step\""),
        (r#"{"step": -1, "stage": "sparse"}"#, "\"step\""),
        (r#"{"step": "7", "stage": "sparse"}"#, "\"step\""),
        (r#"{"step": 3, "stage": "dance"}"#, "\"stage\""),
        (
            r#"{"step": 3, "stage": "sparse", "lm_loss": "2.1"}"#,
            "\"lm_loss\"",
        ),
    ];
    for (bad, needle) in cases {
        let mut lines = run_lines(1, 1);
        lines.push(bad.to_string());
        let metrics = write_lines(tmp.path(), &lines);
        let err = format!(
            "{:#}",
            plot_metrics(&metrics, &tmp.path().join("p.png")).unwrap_err()
        );
        assert!(
            err.contains(&format!("{} line 3", metrics.display())) && err.contains(needle),
            "{bad}: {err}"
        );
    }
    let metrics = write_lines(tmp.path(), &[]);
    let err = format!(
        "{:#}",
        plot_metrics(&metrics, &tmp.path().join("p.png")).unwrap_err()
    );
    assert!(err.contains("holds no records"), "{err}");
    assert!(!tmp.path().join("p.png").exists());

    let metrics = write_lines(
        tmp.path(),
        &["{\"step\": 1, \"stage\": \"warmup\"}".into(), "oops".into()],
    );
    let r = run_cli(&[
        "plot",
        "--metrics",
        path_str(&metrics),
        "--output",
        path_str(&tmp.path().join("p.png")),
    ]);
    assert_clean_error(&r, &[path_str(&metrics), "line 2"]);
    let missing = tmp.path().join("absent.jsonl");
    let r = run_cli(&[
        "plot",
        "--metrics",
        path_str(&missing),
        "--output",
        path_str(&tmp.path().join("p.png")),
    ]);
    assert_clean_error(&r, &[path_str(&missing)]);
}

#[test]
fn stages_that_each_count_from_step_one_are_all_kept_and_drawn_one_after_another() {
    // The miniature reproduction concatenates three runs whose steps each start at 1.
    let tmp = tempfile::tempdir().unwrap();
    let line = |stage: &str, step: u64| {
        serde_json::json!({"step": step, "stage": stage, "lm_loss": 3.0, "indexer_kl": 0.5})
            .to_string()
    };
    let mut lines: Vec<String> = (1..=3).map(|s| line("dense", s)).collect();
    lines.extend((1..=4).map(|s| line("warmup", s)));
    lines.extend((1..=2).map(|s| line("sparse", s)));
    let records = read_metrics(&write_lines(tmp.path(), &lines)).unwrap();
    assert_eq!(records.len(), 9);
    assert_eq!(
        records.iter().map(|r| r.stage).collect::<Vec<_>>()[2..4],
        [Stage::Dense, Stage::Warmup]
    );
    assert_eq!(
        dsa_train::plot::x_positions(&records),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    );
    // A stage that continues the numbering (a sparse run resumed from the warm-up's steps) keeps it.
    let records = read_metrics(&write_lines(tmp.path(), &run_lines(3, 3))).unwrap();
    assert_eq!(
        dsa_train::plot::x_positions(&records),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
}
