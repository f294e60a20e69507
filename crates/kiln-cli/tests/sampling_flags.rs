//! `kiln generate`'s sampling and length flags: out-of-range values are rejected by
//! flag name before any work, whatever the other flags; negative values llama.cpp
//! gives a meaning to are accepted.

mod common;
use common::{kiln_err, kiln_ok, small_model};

fn model() -> &'static str {
    small_model("sampling-flags-small.gguf")
}

#[test]
fn out_of_range_values_are_rejected_by_flag_name() {
    let cases: [(&[&str], &str); 9] = [
        (&["--top-p", "1.5"], "--top-p"),
        (&["--top-p", "0"], "--top-p"),
        // Validated whatever the repetition penalty (it once routed around the check).
        (&["--top-p", "1.5", "--repeat-penalty", "1.1"], "--top-p"),
        (&["--repeat-penalty", "0"], "--repeat-penalty"),
        (&["--repeat-penalty", "nan"], "--repeat-penalty"),
        (&["--repeat-penalty", "-1"], "--repeat-penalty"),
        (&["--min-p", "-0.1"], "--min-p"),
        (&["--temp", "nan"], "--temp"),
        (&["-c", "0"], "--ctx-size"),
    ];
    for (flags, name) in cases {
        let mut args = vec!["generate", "-m", model(), "-p", "ROMEO:", "-n", "2"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--device", "cpu"]);
        let stderr = kiln_err(&args);
        assert!(stderr.contains(name), "{flags:?}: {stderr}");
        assert!(
            !stderr.contains("unexpected argument") && !stderr.contains("sample:"),
            "{flags:?}: the message names the flag and its range: {stderr}"
        );
    }
}

#[test]
fn out_of_range_n_predict_is_rejected_by_flag_name() {
    let stderr = kiln_err(&["generate", "-m", model(), "-n", "-3", "--device", "cpu"]);
    assert!(stderr.contains("--n-predict"), "{stderr}");
}

#[test]
fn a_negative_temperature_is_greedy() {
    let greedy = |temp: &str| {
        kiln_ok(&[
            "generate",
            "-m",
            model(),
            "-p",
            "ROMEO:",
            "-n",
            "12",
            "--temp",
            temp,
            "--device",
            "cpu",
        ])
        .0
    };
    assert_eq!(greedy("-1"), greedy("0"));
}

#[test]
fn n_predict_minus_one_generates_until_the_context_is_full() {
    // "ROMEO:" is BOS and two tokens: 16 positions leave 13 to generate and the
    // last token chosen (which needs no position), 14 in all.
    let (_, stderr) = kiln_ok(&[
        "generate",
        "-m",
        model(),
        "-p",
        "ROMEO:",
        "-n",
        "-1",
        "-c",
        "16",
        "--temp",
        "0",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    assert!(stderr.contains("generated 14 tokens"), "{stderr}");
}
