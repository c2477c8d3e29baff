//! Config validation, tested with files (STYLE.md guideline 9).
//!
//! Covers:
//! - every `tests/config/valid/*.toml` loads;
//! - every `tests/config/invalid/*.toml` fails, with a message containing the text of its
//!   first line, `# expect: <substring>`, and of any `# expect:` lines right after it (so a
//!   file failing for the wrong reason fails);
//! - `examples/smartproxy.toml` loads;
//! - neither directory is empty (a glob that matches nothing must not pass).

use std::path::{Path, PathBuf};

use smartproxy::config::Config;

fn config_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/config")
        .join(kind)
}

/// The `*.toml` files of a directory, sorted; panics if there are none.
fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.toml file in {}", dir.display());
    files
}

#[test]
fn every_valid_file_loads() {
    let failures: Vec<String> = toml_files(&config_dir("valid"))
        .iter()
        .filter_map(|path| Config::from_file(path).err().map(|e| e.to_string()))
        .collect();
    assert!(
        failures.is_empty(),
        "valid files that failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_invalid_file_fails_with_its_expected_message() {
    let mut failures = Vec::new();
    for path in toml_files(&config_dir("invalid")) {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let expected: Vec<&str> = text
            .lines()
            .map_while(|l| l.strip_prefix("# expect: "))
            .collect();
        if expected.is_empty() {
            failures.push(format!(
                "{}: first line must be `# expect: <substring>`",
                path.display()
            ));
            continue;
        }
        match Config::from_file(&path) {
            Ok(_) => failures.push(format!(
                "{}: loaded, expected an error containing {expected:?}",
                path.display()
            )),
            Err(e) => {
                let message = e.to_string();
                for expect in expected.iter().filter(|&&x| !message.contains(x)) {
                    failures.push(format!(
                        "{}: error {message:?} does not contain {expect:?}",
                        path.display()
                    ));
                }
                assert_eq!(
                    e.file(),
                    path,
                    "the error names the file it was loaded from"
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "invalid files not rejected as expected:\n{}",
        failures.join("\n")
    );
}

#[test]
fn example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/smartproxy.toml");
    if let Err(e) = Config::from_file(&path) {
        panic!("{e}");
    }
}
