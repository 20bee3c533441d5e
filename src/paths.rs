//! Paths as the file system resolves them. Runs record and compare paths (a chain's links, a
//! recipe's model and data, "is the model inside the output folder"), and the same place can be
//! spelt many ways: relative to another working directory, through `..`, a trailing slash or a
//! symlink. `resolved` gives one spelling per place; `relative` the way from one to another.

use std::path::{Component, Path, PathBuf};

/// `p` made absolute, `..` applied to what the path before it resolves to, then its longest
/// existing prefix canonicalised (symlinks resolved by the file system); the rest does not
/// exist yet and is kept as written.
pub fn resolved(p: &Path) -> PathBuf {
    // `..` is applied as the kernel applies it: to the place the path so far resolves to (after
    // a symlink, the parent of its target), lexically only where nothing exists yet.
    let mut abs = PathBuf::new();
    for c in std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .components()
    {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if let Ok(real) = abs.canonicalize() {
                    abs = real;
                }
                abs.pop();
            }
            other => abs.push(other),
        }
    }
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = vec![];
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return lexical(&out);
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return lexical(&abs),
        }
    }
}

/// `p` with `.` dropped and `..` applied to the component before it (no file system access).
pub fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `to` as seen from the folder `from` (both resolved first).
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let (a, b) = (resolved(from), resolved(to));
    let (a, b): (Vec<_>, Vec<_>) = (a.components().collect(), b.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for x in &b[common..] {
        rel.push(x);
    }
    if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_per_place() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::os::unix::fs::symlink(d.join("a"), d.join("link")).unwrap();
        assert_eq!(resolved(&d.join("a/b/../b/")), d.join("a/b"));
        assert_eq!(resolved(&d.join("link/b")), d.join("a/b"));
        // Not there yet: the existing part resolved, the rest normalised.
        assert_eq!(resolved(&d.join("link/new/./x/../y")), d.join("a/new/y"));
        // `..` after a symlink: the parent of its target, as the kernel sees it.
        std::fs::create_dir_all(d.join("deep/er")).unwrap();
        std::os::unix::fs::symlink(d.join("deep/er"), d.join("a/jump")).unwrap();
        assert_eq!(resolved(&d.join("a/jump/..")), d.join("deep"));
        assert_eq!(
            relative(&d.join("a/b/step-0"), &d.join("link")),
            PathBuf::from("../..")
        );
        assert_eq!(
            relative(&d.join("a"), &d.join("a/b/c")),
            PathBuf::from("b/c")
        );
    }
}
