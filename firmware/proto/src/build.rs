//! Facts about this build.

/// When this binary was built (Unix seconds; `SOURCE_DATE_EPOCH` if set at build time).
/// Network time never starts below it: a clock that reads earlier is wrong.
pub const BUILD_UNIX_S: u64 = parse(env!("BORG_BUILD_UNIX_S"));

/// The software version of this build (`MAJOR.MINOR.PATCH`): the crate version unless the
/// image was built as a release with `BORG_RELEASE_VERSION`.
pub const VERSION: &str = env!("BORG_VERSION");

const fn parse(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v: u64 = 0;
    while i < b.len() {
        let d = b[i];
        if d < b'0' || d > b'9' {
            return 0;
        }
        v = v.saturating_mul(10).saturating_add((d - b'0') as u64);
        i += 1;
    }
    v
}

#[cfg(test)]
mod tests {
    #[test]
    fn build_time_parses_digits_only() {
        assert_eq!(super::parse("1796083200"), 1_796_083_200);
        assert_eq!(super::parse("12x"), 0);
    }
}
