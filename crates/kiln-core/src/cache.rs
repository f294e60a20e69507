//! Where kiln keeps what it computes once and reuses: compiled kernels
//! (`kernels/`), models converted from checkpoints (`models/`).

use std::path::{Path, PathBuf};

/// kiln's cache directory: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
/// `$HOME/.cache/kiln`, with the variables read through `var` (an empty one counts
/// as unset). `None` when none is set.
pub fn cache_root(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty());
    set("KILN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| set("XDG_CACHE_HOME").map(|d| Path::new(&d).join("kiln")))
        .or_else(|| set("HOME").map(|d| Path::new(&d).join(".cache").join("kiln")))
}

/// [`cache_root`] of the process environment.
pub fn cache_root_from_env() -> Option<PathBuf> {
    cache_root(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Variables from `pairs`.
    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn kiln_cache_dir_then_xdg_then_home() {
        let all = [
            ("KILN_CACHE_DIR", "/k"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_root(vars(&all)), Some(PathBuf::from("/k")));
        let empty_kiln = [
            ("KILN_CACHE_DIR", ""),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(
            cache_root(vars(&empty_kiln)),
            Some(PathBuf::from("/x/kiln"))
        );
        assert_eq!(
            cache_root(vars(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/kiln"))
        );
        assert_eq!(cache_root(vars(&[])), None);
    }
}
