//! `kiln check-ops`: a line per case and a summary, the `--ops` filter and its
//! validation, `--list`, and a device that does not open. The comparison's failures
//! are tested in `kiln_testkit::op_cases` (wrong values, indices and Q8_1 copies fail)
//! and in the command's unit tests (a failed case makes the command fail; an
//! unsupported one is counted apart).

mod common;
use common::{kiln, kiln_err, kiln_ok, texts};

#[test]
fn cpu_passes_every_case_with_a_line_each_and_a_summary() {
    let (stdout, _) = kiln_ok(&["check-ops", "--device", "cpu"]);
    let (listed, _) = kiln_ok(&["check-ops", "--list"]);
    let cases: Vec<&str> = listed.lines().collect();
    assert!(cases.len() > 100, "{listed}");
    for case in &cases {
        assert!(
            stdout.contains(&format!("ok   {case}: ")),
            "no passing line for {case}: {stdout}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(
        stdout.contains("against the float64 oracle, seed 1"),
        "{stdout}"
    );
    assert!(
        stdout.lines().last().is_some_and(|l| l
            == format!(
                "{} passed, 0 failed, 0 unsupported on this device",
                cases.len()
            )),
        "{stdout}"
    );
}

#[test]
fn ops_filters_the_cases() {
    let (stdout, _) = kiln_ok(&[
        "check-ops",
        "--device",
        "cpu",
        "--ops",
        "softmax,cast",
        "--seed",
        "9",
    ]);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ok")).collect();
    assert!(!lines.is_empty(), "{stdout}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("ok   softmax ") || l.starts_with("ok   cast ")),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("ok   cast ")),
        "{stdout}"
    );
    assert!(stdout.contains("seed 9"), "{stdout}");
    assert!(
        stdout.ends_with(&format!(
            "{} passed, 0 failed, 0 unsupported on this device\n",
            lines.len()
        )),
        "{stdout}"
    );
}

#[test]
fn an_unknown_op_is_a_usage_error_naming_the_known_ones() {
    let out = kiln(&["check-ops", "--device", "cpu", "--ops", "matmul,softmaxx"]);
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty(), "nothing ran: {stdout}");
    assert!(
        stderr.contains("unknown op \"softmaxx\"") && stderr.contains("attention"),
        "{stderr}"
    );
}

#[test]
fn a_device_that_does_not_open_is_an_error() {
    let stderr = kiln_err(&["check-ops", "--device", "cuda:99"]);
    assert!(stderr.starts_with("error: "), "{stderr}");
}
