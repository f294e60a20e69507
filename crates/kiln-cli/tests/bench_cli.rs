//! `kiln bench` on the project's small model, on the CPU: llama-bench's table, a
//! line of progress per test, and the JSON report.

mod common;
use common::{kiln_ok, small_model};

fn model() -> &'static str {
    small_model("bench-small.gguf")
}

const ARGS: [&str; 11] = [
    "-p",
    "16",
    "-n",
    "4",
    "-r",
    "1",
    "-d",
    "0,4",
    "--device",
    "cpu",
    "--copy-mib",
];

#[test]
fn bench_prints_llama_bench_rows_and_progress() {
    let mut args = vec!["bench", "-m", model()];
    args.extend(ARGS);
    args.push("8");
    let (stdout, stderr) = kiln_ok(&args);
    assert!(
        stdout.contains("| model | size | params | backend | test | t/s | efficiency |"),
        "{stdout}"
    );
    // The small model is 21 MiB of f16 weights and 11 M parameters.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| llama "))
        .collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for (row, test) in rows.iter().zip(["pp16", "tg4", "pp16 @ d4", "tg4 @ d4"]) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[1], "llama 11M F16", "{row}");
        assert!(
            cells[2].ends_with(" MiB") && cells[3].ends_with(" M"),
            "{row}"
        );
        assert_eq!((cells[4], cells[5]), ("cpu", test), "{row}");
        let rate: f64 = cells[6].split(' ').next().unwrap().parse().unwrap();
        assert!(rate > 0.0, "{row}");
    }
    for i in 1..=4 {
        assert!(stderr.contains(&format!("test {i} of 4")), "{stderr}");
    }
}

#[test]
fn bench_json_reports_every_test() {
    let mut args = vec!["bench", "-m", model(), "--json"];
    args.extend(ARGS);
    args.push("8");
    let (stdout, _) = kiln_ok(&args);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    let tests = report["tests"].as_array().expect("tests");
    let names: Vec<(&str, u64)> = tests
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["depth"].as_u64().unwrap()))
        .collect();
    assert_eq!(names, [("pp16", 0), ("tg4", 0), ("pp16", 4), ("tg4", 4)]);
    assert!(tests
        .iter()
        .all(|t| t["tokens_per_s"]["mean"].as_f64().unwrap() > 0.0));
    assert_eq!(report["backend"], "cpu");
    assert_eq!(report["copy_bytes"], 8 << 20);
}

#[test]
fn bench_batch_prints_a_row_per_batch_size() {
    let args = [
        "bench",
        "-m",
        model(),
        "--batch",
        "1,3",
        "-p",
        "5",
        "-n",
        "3",
        "-r",
        "1",
        "--device",
        "cpu",
        "--copy-mib",
        "8",
    ];
    let (stdout, stderr) = kiln_ok(&args);
    assert!(
        stdout.contains(
            "| model | backend | B | prompt | gen | prompt time | total t/s | t/s per stream |"
        ),
        "{stdout}"
    );
    // Without pp and tg tests, no table of them.
    assert!(!stdout.contains("| test |"), "{stdout}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| llama "))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (cells, b) in rows.iter().zip(["1", "3"]) {
        assert_eq!(&cells[2..6], ["cpu", b, "5", "3"], "{cells:?}");
        let total: f64 = cells[7].parse().unwrap();
        let stream: f64 = cells[8].parse().unwrap();
        assert!(total > 0.0 && stream > 0.0, "{cells:?}");
        // B streams share the total (both printed to 0.1).
        let b: f64 = b.parse().unwrap();
        assert!(
            (total - b * stream).abs() <= 0.05 * (b + 1.0) + 1e-9,
            "{cells:?}"
        );
    }
    assert!(stderr.contains("kiln: batch 3:"), "{stderr}");
}
