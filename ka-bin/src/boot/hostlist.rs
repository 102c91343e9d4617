//! Host lists: `node[001-004,010]` expands to node001…node004, node010.
//!
//! The same notation names ranges in the inventory and selects nodes on the
//! command line, so an administrator types what the inventory says.

/// The most names one host list may give: a typo like `node[1-1000000]`,
/// or groups that multiply (`r[1-1000]n[1-1000]`), must not eat the
/// machine's memory.
pub const MAX_NAMES: usize = 100_000;

/// Expands a host list into names, in order.
///
/// Each `[…]` holds comma-separated numbers or `a-b` ranges; a range keeps the
/// width of its first bound (`[001-100]` pads to three digits). Several
/// bracket groups multiply (`r[1-2]n[1-2]` gives r1n1, r1n2, r2n1, r2n2).
/// Returns a message fit for the user when the notation is broken.
pub fn expand(spec: &str) -> Result<Vec<String>, String> {
    let Some(open) = spec.find('[') else {
        if spec.contains(']') {
            return Err(format!("`{spec}` has a `]` without its `[`"));
        }
        return Ok(vec![spec.to_string()]);
    };
    let close = spec[open..]
        .find(']')
        .map(|i| open + i)
        .ok_or_else(|| format!("`{spec}` has a `[` without its `]`"))?;
    let (prefix, body, rest) = (&spec[..open], &spec[open + 1..close], &spec[close + 1..]);
    if prefix.contains(']') {
        return Err(format!("`{spec}` has a `]` without its `[`"));
    }
    let tails = expand(rest)?;
    let mut ranges = Vec::new();
    for item in body.split(',') {
        let item = item.trim();
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (item, item),
        };
        let width = lo.len();
        let parse = |s: &str| {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                Err(format!(
                    "`{spec}`: `{item}` is not a number or a range like 001-016"
                ))
            } else {
                s.parse::<u64>()
                    .map_err(|_| format!("`{spec}`: `{s}` is too large"))
            }
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if hi < lo {
            return Err(format!("`{spec}`: range `{item}` runs backwards"));
        }
        ranges.push((lo, hi, width));
    }
    // Counted before anything is made, so no notation can allocate more.
    let count = ranges
        .iter()
        .map(|&(lo, hi, _)| (hi - lo).saturating_add(1))
        .fold(0u64, u64::saturating_add)
        .saturating_mul(tails.len() as u64);
    if count > MAX_NAMES as u64 {
        return Err(format!(
            "`{spec}` gives {count} names, more than {MAX_NAMES}: check the ranges"
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    for (lo, hi, width) in ranges {
        for n in lo..=hi {
            for tail in &tails {
                out.push(format!("{prefix}{n:0width$}{tail}"));
            }
        }
    }
    Ok(out)
}

/// Whether `spec` uses the bracket notation.
pub fn is_pattern(spec: &str) -> bool {
    spec.contains('[')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_name_is_itself() {
        assert_eq!(expand("node7").unwrap(), vec!["node7"]);
    }

    #[test]
    fn range_keeps_padding_of_first_bound() {
        assert_eq!(
            expand("node[008-011]").unwrap(),
            vec!["node008", "node009", "node010", "node011"]
        );
    }

    #[test]
    fn lists_and_suffixes_and_several_groups() {
        assert_eq!(expand("n[1,3-4]x").unwrap(), vec!["n1x", "n3x", "n4x"]);
        assert_eq!(
            expand("r[1-2]n[1-2]").unwrap(),
            vec!["r1n1", "r1n2", "r2n1", "r2n2"]
        );
    }

    #[test]
    fn broken_notation_is_explained() {
        assert!(expand("node[1-").unwrap_err().contains("without its `]`"));
        assert!(expand("node]1").unwrap_err().contains("without its `[`"));
        assert!(expand("node[5-1]").unwrap_err().contains("backwards"));
        assert!(expand("node[a-b]").unwrap_err().contains("not a number"));
        assert!(expand("node[1-9999999]").unwrap_err().contains("more than"));
    }

    #[test]
    fn groups_that_multiply_past_the_limit_are_refused_before_any_is_made() {
        let err = expand("r[1-1000]n[1-1000]").unwrap_err();
        assert!(err.contains("1000000 names"), "{err}");
        assert!(expand("n[1-60000,1-60000]").unwrap_err().contains("120000"));
        assert!(expand("a[0-18446744073709551615]b[1-2]").is_err());
        assert_eq!(expand("r[1-100]n[1-1000]").unwrap().len(), MAX_NAMES);
    }
}
