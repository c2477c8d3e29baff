//! The config loader on arbitrary text: it returns `Ok` or a `ConfigError` naming the key
//! (or the line and column of a syntax error), and never panics.
//!
//! Seeds: `tests/config/{valid,invalid}/*.toml` and `examples/smartproxy.toml`
//! (`cargo xtask fuzz` passes those directories to libFuzzer).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smartproxy::config::Config;

fuzz_target!(|text: &str| {
    // A file name without a directory: relative `cert`/`key` paths resolve against the
    // current directory, as for a config in the working directory.
    if let Err(e) = Config::from_str(text, Path::new("fuzz.toml")) {
        assert!(!e.key().is_empty(), "error without a key: {e}");
    }
});
