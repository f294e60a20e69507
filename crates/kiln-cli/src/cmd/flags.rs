//! Parsers of flag values with a range: clap reports a value they reject as
//! "invalid value 'V' for '--FLAG <..>': REASON", naming the flag, before any work.

/// A number (not NaN nor infinite).
fn finite(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{s} is not a finite number"))
    }
}

/// `--temp`: any finite number; 0 or below is greedy decoding, as in llama.cpp.
pub fn temperature(s: &str) -> Result<f32, String> {
    finite(s)
}

/// `--top-p`: in (0, 1]; 1 keeps every token.
pub fn top_p(s: &str) -> Result<f32, String> {
    let v = finite(s)?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is outside (0, 1]; 1 turns top-p off"))
    }
}

/// `--min-p`: in [0, 1]; 0 keeps every token.
pub fn min_p(s: &str) -> Result<f32, String> {
    let v = finite(s)?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside [0, 1]; 0 turns min-p off"))
    }
}

/// `--repeat-penalty`: a finite number above 0; 1 turns the penalty off.
pub fn repeat_penalty(s: &str) -> Result<f32, String> {
    let v = finite(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not above 0; 1 turns the penalty off, above 1 discourages repeats"
        ))
    }
}

/// `-n, --n-predict`: a count of tokens, or -1 (or -2, as llama.cpp) for "until
/// the end of generation or a full context".
pub fn n_predict(s: &str) -> Result<i64, String> {
    let v: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if v >= -2 {
        Ok(v)
    } else {
        Err(format!(
            "{v} is not a count of tokens; give one, or -1 to generate until the context is full"
        ))
    }
}

/// `-c, --ctx-size`: at least 1 position.
pub fn ctx_size(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a count of positions"))?;
    if v >= 1 {
        Ok(v)
    } else {
        Err(
            "the context must hold at least 1 position; leave the flag out for the model's own"
                .to_string(),
        )
    }
}

/// `--chunks`: at least 1 window.
pub fn chunks(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a count of windows; give 1 or more, or leave the flag out for all"
        )),
    }
}

/// `--ubatch-size`: at least 1 token per prefill chunk.
pub fn ubatch_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a count of tokens; a prefill chunk holds 1 or more"
        )),
    }
}

/// `--parallel`: at least 1 sequence at once.
pub fn parallel(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!("{s:?} is not a count of sequences; give 1 or more")),
    }
}

/// `--queue`: at least 1 waiting request.
pub fn queue(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a count of requests; at least 1 may wait for a slot"
        )),
    }
}

/// Warns (as llama.cpp does) when `--ctx-size` asks for more positions than the
/// model was trained on: past those, its output degrades.
pub fn warn_above_trained_context(context: usize, trained: usize) {
    if context > trained {
        tracing::warn!(
            "--ctx-size {context} is above the {trained} positions the model was trained on; text past position {trained} is likely to degrade"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(temperature("-1"), Ok(-1.0));
        assert!(temperature("nan").is_err() && temperature("inf").is_err());
        assert!(top_p("1").is_ok() && top_p("0").is_err() && top_p("1.5").is_err());
        assert!(min_p("0").is_ok() && min_p("-0.1").is_err() && min_p("nan").is_err());
        assert!(repeat_penalty("1.1").is_ok() && repeat_penalty("0").is_err());
        assert!(repeat_penalty("nan").is_err() && repeat_penalty("-1").is_err());
        assert_eq!(n_predict("-1"), Ok(-1));
        assert!(n_predict("-3").is_err() && n_predict("x").is_err());
        assert_eq!(ctx_size("16"), Ok(16));
        assert!(ctx_size("0").is_err());
        assert_eq!(chunks("3"), Ok(3));
        assert!(chunks("0").is_err() && chunks("-1").is_err());
        assert_eq!(ubatch_size("512"), Ok(512));
        assert!(ubatch_size("0").is_err() && ubatch_size("x").is_err());
        assert_eq!(parallel("4"), Ok(4));
        assert!(parallel("0").is_err() && parallel("-1").is_err());
        assert_eq!(queue("1"), Ok(1));
        assert!(queue("0").is_err() && queue("many").is_err());
    }
}
