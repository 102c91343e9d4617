//! Sizes and rates as operators write them. Here rather than in a command
//! line because both the `ka` command and the simulator take image sizes,
//! and ka-core is the one crate both depend on.

/// Parses sizes like `4096`, `64KiB`, `256MiB`, `1GiB` (also K, M, G, KB, MB, GB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256MiB"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("unknown size unit {unit:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s} is too large"))
}

/// Parses a rate in bytes per second from `50MiB`, `10MB/s` (bytes, as
/// [`parse_size`]) or `100Mbit`, `1Gbit/s`, `800kbit` (bits: decimal, as
/// network people write them, divided by 8).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let lower = t.to_ascii_lowercase();
    let bits = [
        ("gbit", 1_000_000_000u64),
        ("mbit", 1_000_000),
        ("kbit", 1000),
        ("bit", 1),
    ]
    .into_iter()
    .find(|(unit, _)| lower.ends_with(unit));
    let rate = match bits {
        Some((unit, mult)) => {
            let num = &t[..t.len() - unit.len()];
            let n: u64 = num
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a rate like 100Mbit or 50MiB"))?;
            n.checked_mul(mult)
                .ok_or_else(|| format!("{s} is too large"))?
                / 8
        }
        None => parse_size(t).map_err(|e| format!("{e} (a rate: 100Mbit, 50MiB)"))?,
    };
    if rate == 0 {
        return Err(format!("{s:?} is no rate at all: give more than 0"));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("12parsecs").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn rates_parse_in_bytes_and_in_bits() {
        assert_eq!(parse_rate("50MiB"), Ok(50 << 20));
        assert_eq!(parse_rate("10MB/s"), Ok(10_000_000));
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1Gbit/s"), Ok(125_000_000));
        assert_eq!(parse_rate("800kbit"), Ok(100_000));
        assert!(parse_rate("0MiB").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
