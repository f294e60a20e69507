//! `kiln check-ops`: every case of the op table (`kiln_testkit::op_cases`) on one
//! backend, like llama.cpp's test-backend-ops. On the CPU each case is compared with
//! its float64 oracle; on a CUDA device with the CPU reference. One line per case,
//! a summary, and an error (exit status 1) when any case fails. A case whose op the
//! device does not implement is reported as unsupported and counted on its own: not
//! a pass, and not a failure.

use std::io::Write;

use kiln_core::{Error, Result};
use kiln_cpu::CpuBackend;
use kiln_cuda::{CacheConfig, CudaBackend};
use kiln_testkit::op_cases::{
    check_against_oracle, check_against_reference, op_cases, op_names, OpCase, Outcome, Report,
};

use super::device::{resolve, Device, DeviceArgs};

/// Arguments of `kiln check-ops`.
#[derive(clap::Args)]
pub struct CheckOpsArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Only the cases of these ops, comma-separated (e.g. matmul,attention); --list
    /// shows every op and case.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...", value_parser = op_name)]
    pub ops: Vec<String>,
    /// Seed of the cases' random inputs: a failure replays with the same seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the cases that would run, and run none.
    #[arg(long)]
    pub list: bool,
}

/// `--ops` values: the name of an op the table covers.
fn op_name(s: &str) -> std::result::Result<String, String> {
    let names = op_names(&op_cases());
    if names.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown op {s:?}: expected one of {}",
            names.join(", ")
        ))
    }
}

/// The cases `ops` selects (every case when it is empty).
fn selected(ops: &[String]) -> Vec<OpCase> {
    op_cases()
        .into_iter()
        .filter(|c| ops.is_empty() || ops.iter().any(|o| o == c.op))
        .collect()
}

/// Runs (or with `--list`, lists) the selected cases on the chosen device.
pub fn run(args: CheckOpsArgs) -> Result<()> {
    let cases = selected(&args.ops);
    if args.list {
        for case in &cases {
            println!("{}", case.name());
        }
        return Ok(());
    }
    match resolve(args.device.device)? {
        Device::Cpu => {
            let backend = CpuBackend;
            println!(
                "check-ops: {} cases on cpu against the float64 oracle, seed {}",
                cases.len(),
                args.seed
            );
            summarize(
                "cpu",
                &cases,
                args.seed,
                run_cases(&cases, |case| {
                    check_against_oracle(case, args.seed, &backend)
                }),
            )
        }
        Device::Cuda(device) => {
            let name = format!("cuda:{} ({})", device.ordinal(), device.name());
            let backend = CudaBackend::on_device(device, CacheConfig::from_env()?)?;
            println!(
                "check-ops: {} cases on {name} against the cpu reference, seed {}",
                cases.len(),
                args.seed
            );
            summarize(
                "cuda",
                &cases,
                args.seed,
                run_cases(&cases, |case| {
                    check_against_reference(case, args.seed, &backend, &CpuBackend)
                }),
            )
        }
    }
}

/// How many cases failed, and how many the device does not implement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    failed: usize,
    unsupported: usize,
}

/// Runs `check` on each case, printing a line per case as it finishes (`ok`, `FAIL`
/// or `n/a` for an op the device does not implement); returns the tally.
fn run_cases(cases: &[OpCase], check: impl Fn(&OpCase) -> Report) -> Tally {
    let mut tally = Tally::default();
    for case in cases {
        let report = check(case);
        let verdict = match report.outcome {
            Outcome::Passed => "ok  ",
            Outcome::Failed => "FAIL",
            Outcome::Unsupported => "n/a ",
        };
        tally.failed += usize::from(report.outcome == Outcome::Failed);
        tally.unsupported += usize::from(report.outcome == Outcome::Unsupported);
        println!("{verdict} {}: {}", case.name(), report.detail);
        // A line per case as it finishes, even into a pipe.
        let _ = std::io::stdout().flush();
    }
    tally
}

/// Prints the summary; an error when any case failed (unsupported ones are counted,
/// not failed).
fn summarize(backend: &'static str, cases: &[OpCase], seed: u64, tally: Tally) -> Result<()> {
    let Tally {
        failed,
        unsupported,
    } = tally;
    println!(
        "{} passed, {failed} failed, {unsupported} unsupported on this device",
        cases.len() - failed - unsupported
    );
    if failed == 0 {
        Ok(())
    } else {
        Err(Error::Backend {
            backend,
            msg: format!(
                "{failed} of {} op cases failed (replay one with --ops NAME --seed {seed})",
                cases.len()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_are_checked_against_the_table() {
        assert_eq!(op_name("matmul"), Ok("matmul".to_string()));
        let e = op_name("matmull").unwrap_err();
        assert!(
            e.contains("unknown op \"matmull\"") && e.contains("attention"),
            "{e}"
        );
    }

    #[test]
    fn a_filter_selects_only_its_ops_and_none_selects_all() {
        let some = selected(&["softmax".to_string(), "cast".to_string()]);
        assert!(!some.is_empty());
        assert!(some.iter().all(|c| c.op == "softmax" || c.op == "cast"));
        assert!(some.iter().any(|c| c.op == "cast"));
        assert_eq!(selected(&[]).len(), op_cases().len());
    }

    #[test]
    fn any_failure_is_an_error_naming_the_count_and_seed() {
        let cases = selected(&["softmax".to_string()]);
        let tally = |failed, unsupported| Tally {
            failed,
            unsupported,
        };
        assert!(summarize("cpu", &cases, 7, tally(0, 0)).is_ok());
        assert!(summarize("cpu", &cases, 7, tally(0, 1)).is_ok());
        let e = summarize("cpu", &cases, 7, tally(2, 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("2 of {} op cases failed", cases.len())),
            "{e}"
        );
        assert!(e.contains("--seed 7"), "{e}");
    }

    #[test]
    fn failing_and_unsupported_checks_are_counted_apart() {
        let cases = selected(&["argmax".to_string()]);
        let tally = run_cases(&cases, |c| Report {
            outcome: match &c.label[..3] {
                "1x1" => Outcome::Failed,
                "3x1" => Outcome::Unsupported,
                _ => Outcome::Passed,
            },
            detail: "wrong".to_string(),
        });
        assert_eq!(
            tally,
            Tally {
                failed: 1,
                unsupported: 1
            }
        );
    }
}
