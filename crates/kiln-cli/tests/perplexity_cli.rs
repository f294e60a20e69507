//! `kiln perplexity` on the project's small model and its held-out text.

mod common;
use common::{kiln_err, kiln_ok, shakespeare_dir, small_model, temp_path};

fn model() -> &'static str {
    small_model("perplexity-small.gguf")
}

/// The validation loss the model's README records (nats per token, every position
/// of windows of 512 tokens).
const README_LOSS: f64 = 3.562;

/// `n` passages of at least `min_chars` characters (whole lines) from evenly spaced
/// places of the held-out text, one after another: a short text that samples all
/// of it rather than one play's ending.
fn held_out_sample(n: usize, min_chars: usize) -> String {
    let text = std::fs::read_to_string(shakespeare_dir().join("heldout.txt")).unwrap();
    let bytes = text.as_bytes();
    // The start of the line after byte `at` (or `at` itself at a line start): a
    // character boundary, where `text` can be sliced.
    let next_line = |at: usize| match bytes[at.min(bytes.len())..]
        .iter()
        .position(|&b| b == b'\n')
    {
        Some(i) => at + i + 1,
        None => bytes.len(),
    };
    let passages: Vec<&str> = (0..n)
        .map(|k| {
            let at = k * bytes.len() / n;
            let start = if at == 0 { 0 } else { next_line(at - 1) };
            let mut end = start;
            while end - start < min_chars && end < bytes.len() {
                end = next_line(end);
            }
            &text[start..end]
        })
        .collect();
    passages.join("\n")
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> f64 {
    let rest = &text[text
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {text}"))
        + label.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("a number after {label:?} in {text}"))
}

#[test]
fn perplexity_of_the_small_model_on_held_out_text_is_its_validation_loss() {
    let text = temp_path("perplexity-heldout-sample.txt");
    std::fs::write(&text, held_out_sample(32, 400)).unwrap();
    let (stdout, stderr) = kiln_ok(&[
        "perplexity",
        "-m",
        model(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "128",
        "--device",
        "cpu",
    ]);
    // 32 passages are about 4,400 tokens: 34 windows of 128, 63 tokens scored in each.
    assert!(
        stdout.starts_with("[1]") && stdout.contains(",[34]"),
        "{stdout}\n{stderr}"
    );
    // "Final estimate: PPL = P +/- E (ln PPL = L +/- S nats per token over N tokens)"
    let fin = &stdout[stdout.find("Final estimate:").expect("a final estimate")..];
    let ppl = number_after(fin, "PPL =");
    let ppl_error = number_after(fin, "+/-");
    let ln_part = &fin[fin.find("ln PPL").expect("ln PPL")..];
    let ln_ppl = number_after(ln_part, "ln PPL =");
    let ln_error = number_after(ln_part, "+/-");
    assert!(ppl.is_finite() && ppl > 1.0, "{stdout}");
    assert!((ppl.ln() - ln_ppl).abs() < 1e-3, "{stdout}");
    assert!(
        ppl_error > 0.0 && ln_error > 0.0 && ln_error < 0.2,
        "{stdout}"
    );
    // The README's loss scores every position of windows of 512 (from 1 token of
    // context to 511); this scores positions 64 to 126 of windows of 128. Over the
    // whole held-out text the two give 3.550 and 3.549 (the model's README), so the
    // windows explain about 0.01 nats of difference: the bound allows 0.05 for them
    // and four standard errors of this sample's estimate (each about 0.06, as
    // printed). Scoring a token against the wrong position's logits, or running a
    // window without its BOS, lands far outside.
    let bound = 0.05 + 4.0 * ln_error;
    assert!(
        (ln_ppl - README_LOSS).abs() < bound,
        "ln PPL {ln_ppl} +/- {ln_error} is more than {bound} from {README_LOSS}: {stdout}"
    );
}

#[test]
fn a_text_shorter_than_a_window_is_named() {
    let text = temp_path("perplexity-short.txt");
    std::fs::write(
        &text,
        "ROMEO:\nBut soft, what light through yonder window breaks?\n",
    )
    .unwrap();
    let stderr = kiln_err(&[
        "perplexity",
        "-m",
        model(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "64",
        "--device",
        "cpu",
    ]);
    assert!(
        stderr.contains("perplexity-short.txt") && stderr.contains("--ctx-size 64"),
        "{stderr}"
    );
    let stderr = kiln_err(&[
        "perplexity",
        "-m",
        model(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(stderr.contains("--ctx-size"), "{stderr}");
}
