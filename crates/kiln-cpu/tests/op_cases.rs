//! The CPU reference against the float64 oracle of every case of the shared op table
//! (`kiln_testkit::op_cases`), the table `kiln check-ops` and the CUDA tests also run.

use kiln_cpu::CpuBackend;
use kiln_testkit::op_cases::{check_against_oracle, op_cases};

#[test]
fn every_op_case_matches_its_oracle() {
    let seed = kiln_testkit::seed("every_op_case_matches_its_oracle");
    let cases = op_cases();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let report = check_against_oracle(case, seed, &CpuBackend);
            eprintln!("{}: {}", case.name(), report.detail);
            (!report.passed()).then(|| format!("{}: {}", case.name(), report.detail))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
