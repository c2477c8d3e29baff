//! The `[proxy]` lines that put a test proxy on a data path, for both kinds of tests: the
//! `auto` runs of the lifecycle tests take their knobs from here alone.

use std::fmt::Display;

/// The knobs of a test proxy on `data_path = "auto"`: each plain connection goes into the
/// kernel at its first read (a splice rate of one byte a second in either direction; the
/// leave rate must be lower, hence 0) and stays there (one move, that splice). A test written for the kernel
/// path then runs across a splice in the middle of its connection, and may expect what it
/// expects of the kernel path afterwards. The moves back and forth have tests of their own
/// (`tests/tests/adaptive.rs`).
pub const AUTO_SPLICE_AT_FIRST_READ: &str =
    "auto_splice_rate = 1\nauto_splice_one_way = true\nauto_leave_rate = 0\nauto_max_moves = 1";

/// The `[proxy]` lines of a test proxy on `data_path` (`userspace`, `ebpf` or `auto`):
/// the `data_path` key and, on `auto`, [`AUTO_SPLICE_AT_FIRST_READ`]. No trailing newline.
pub fn data_path_lines(data_path: impl Display) -> String {
    let data_path = data_path.to_string();
    if data_path == "auto" {
        format!("data_path = \"auto\"\n{AUTO_SPLICE_AT_FIRST_READ}")
    } else {
        format!("data_path = \"{data_path}\"")
    }
}
