//! The CUDA backend against the CPU reference (kiln-cpu) on every case of the shared
//! op table (`kiln_testkit::op_cases`), the table `kiln check-ops --device cuda` runs.

mod common;
use common::*;
use kiln_cpu::CpuBackend;
use kiln_testkit::op_cases::{check_against_reference, op_cases, Outcome};

/// Ops the CUDA backend does not implement yet: their cases are reported as
/// unsupported, not failed. Any other unsupported op fails the test.
const NOT_IMPLEMENTED: [&str; 1] = ["moe_matmul"];

#[test]
#[ignore = "needs a CUDA device"]
fn every_op_case_matches_cpu() {
    let cuda = cuda();
    let seed = seed("every_op_case_matches_cpu");
    let cases = op_cases();
    let (mut failures, mut unsupported) = (Vec::new(), Vec::new());
    for case in &cases {
        let report = check_against_reference(case, seed, cuda, &CpuBackend);
        eprintln!("{}: {}", case.name(), report.detail);
        let line = format!("{}: {}", case.name(), report.detail);
        match report.outcome {
            Outcome::Passed => {}
            Outcome::Unsupported if NOT_IMPLEMENTED.contains(&case.op) => unsupported.push(line),
            Outcome::Unsupported | Outcome::Failed => failures.push(line),
        }
    }
    eprintln!(
        "{} of {} cases unsupported (known gaps {NOT_IMPLEMENTED:?}):\n{}",
        unsupported.len(),
        cases.len(),
        unsupported.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
