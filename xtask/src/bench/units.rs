//! Byte sizes on the command line (`64MiB`, `1GiB`) and numbers in the report.

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Parses a byte size: a whole number with an optional binary unit (`B`, `KiB`/`K`, `MiB`/`M`,
/// `GiB`/`G`; case-insensitive). Used as a clap value parser.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?}: expected a whole number with an optional unit, e.g. 64MiB")
    })?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => MIB,
        "g" | "gib" => GIB,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?}: too large"))
}

/// A size for humans: `64 MiB`, `1 GiB`, `1536 KiB`.
pub fn show_bytes(bytes: u64) -> String {
    for (unit, scale) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{} {unit}", bytes / scale);
        }
    }
    format!("{bytes} B")
}

/// About three significant digits, no exponent: `1234`, `12.3`, `1.23`, `0.012`.
pub fn show_number(value: f64) -> String {
    let magnitude = value.abs();
    let decimals = if magnitude >= 100.0 || magnitude == 0.0 {
        0
    } else if magnitude >= 10.0 {
        1
    } else if magnitude >= 1.0 {
        2
    } else {
        3
    };
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_bytes("1GiB"), Ok(GIB));
        assert_eq!(parse_bytes("10m"), Ok(10 * MIB));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 * KIB));
        assert!(parse_bytes("1.5GiB").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("3TiB").is_err());
    }

    #[test]
    fn sizes_show_in_the_largest_whole_unit() {
        assert_eq!(show_bytes(GIB), "1 GiB");
        assert_eq!(show_bytes(64 * MIB), "64 MiB");
        assert_eq!(show_bytes(1536 * KIB), "1536 KiB");
        assert_eq!(show_bytes(100), "100 B");
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(show_number(1234.4), "1234");
        assert_eq!(show_number(12.34), "12.3");
        assert_eq!(show_number(1.234), "1.23");
        assert_eq!(show_number(0.01234), "0.012");
        assert_eq!(show_number(0.0), "0");
    }
}
