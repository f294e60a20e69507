//! The CUDA backend against the CPU reference (kiln-cpu) on every case of the shared
//! op table (`kiln_testkit::op_cases`), the table `kiln check-ops --device cuda` runs.

mod common;
use common::*;
use kiln_cpu::CpuBackend;
use kiln_testkit::op_cases::{check_against_reference, op_cases, Outcome};

#[test]
#[ignore = "needs a CUDA device"]
fn every_op_case_matches_cpu() {
    let cuda = cuda();
    let seed = seed("every_op_case_matches_cpu");
    let cases = op_cases();
    let mut failures = Vec::new();
    for case in &cases {
        let report = check_against_reference(case, seed, cuda, &CpuBackend);
        eprintln!("{}: {}", case.name(), report.detail);
        let line = format!("{}: {}", case.name(), report.detail);
        match report.outcome {
            Outcome::Passed => {}
            Outcome::Unsupported | Outcome::Failed => failures.push(line),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
