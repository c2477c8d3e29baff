//! Config validation, tested with the files under `tests/config/`.
//!
//! Covers:
//! - every `tests/config/valid/*.toml` loads;
//! - every `tests/config/invalid/*.toml` fails, with a message containing the text of its
//!   first line, `# expect: <substring>`, and of any `# expect:` lines right after it (so a
//!   file failing for the wrong reason fails);
//! - `examples/smartproxy.toml` loads;
//! - `dist/smartproxy.toml` passes `smartproxy check`, and `dist/smartproxy.service` is a
//!   notify unit with reload, restart, descriptor limit, the BPF capabilities, and a
//!   runtime directory that holds the sample's control socket;
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

fn dist_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(name)
}

#[test]
fn dist_sample_config_passes_check() {
    let path = dist_file("smartproxy.toml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_smartproxy"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("smartproxy check runs");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn dist_service_unit_has_what_an_operator_needs() {
    let path = dist_file("smartproxy.service");
    let unit = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value = |key: &str| -> &str {
        unit.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{}: no {key}=", path.display()))
    };
    assert_eq!(value("Type"), "notify");
    // Runs `smartproxy reload`, which waits and exits 1 on a refused config, so that
    // `systemctl reload` fails too (a SIGHUP would always succeed).
    assert_eq!(
        value("ExecReload"),
        "/usr/bin/smartproxy reload --config /etc/smartproxy/smartproxy.toml"
    );
    assert_eq!(value("Restart"), "on-failure");
    assert!(value("LimitNOFILE")
        .parse::<u64>()
        .is_ok_and(|n| n >= 65536));
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let caps: Vec<&str> = value(key).split_whitespace().collect();
        for cap in [
            "CAP_BPF",
            "CAP_NET_ADMIN",
            "CAP_PERFMON",
            "CAP_NET_BIND_SERVICE",
        ] {
            assert!(caps.contains(&cap), "{key} lacks {cap}: {caps:?}");
        }
    }
    let runtime = Path::new("/run").join(value("RuntimeDirectory"));
    let config = Config::from_file(&dist_file("smartproxy.toml")).expect("the sample loads");
    assert_eq!(
        config.proxy.control_socket.parent(),
        Some(runtime.as_path()),
        "the sample's control socket lives in the unit's RuntimeDirectory"
    );
    assert!(
        value("ExecStart").contains("run --config /etc/smartproxy/smartproxy.toml"),
        "ExecStart runs the installed config"
    );
}
