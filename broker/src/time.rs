//! Wall-clock helpers; everything user-visible is Unix milliseconds.

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration written as a number and a unit: `90s`, `30m`, `12h`, `30d`, `2w` (a bare
/// number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a duration like 90s, 30m, 12h, 30d or 2w"))?;
    let per = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(format!("unknown unit `{other}` in `{s}`; use s, m, h, d or w")),
    };
    n.checked_mul(per).map(std::time::Duration::from_secs).ok_or_else(|| format!("`{s}` is too long"))
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian), after Howard Hinnant.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses an RFC 3339 time (`2026-12-31T23:59:59Z`, `2026-12-31T23:59:59+02:00`) or a
/// date (`2026-12-31`, midnight UTC) into Unix milliseconds.
pub fn parse_datetime(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a date (2026-12-31) or an RFC 3339 time (2026-12-31T23:59:59Z)");
    let s = s.trim();
    let num = |from: usize, len: usize| -> Result<u32, String> {
        s.get(from..from + len)
            .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    if s.len() < 10 || s.as_bytes().get(4) != Some(&b'-') || s.as_bytes().get(7) != Some(&b'-') {
        return Err(bad());
    }
    let (y, m, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut secs = days_from_civil(i64::from(y), m, d) * 86_400;
    if s.len() > 10 {
        if !matches!(s.as_bytes().get(10), Some(b'T' | b't' | b' ')) || s.len() < 19 {
            return Err(bad());
        }
        if s.as_bytes().get(13) != Some(&b':') || s.as_bytes().get(16) != Some(&b':') {
            return Err(bad());
        }
        let (h, mi, se) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
        if h > 23 || mi > 59 || se > 60 {
            return Err(bad());
        }
        secs += i64::from(h * 3_600 + mi * 60 + se);
        let mut rest = s.get(19..).unwrap_or_default();
        if let Some(frac) = rest.strip_prefix('.') {
            let digits = frac.find(|c: char| !c.is_ascii_digit()).unwrap_or(frac.len());
            rest = frac.get(digits..).unwrap_or_default();
        }
        match rest {
            "Z" | "z" => {}
            tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) => {
                let sign = if tz.starts_with('-') { -1 } else { 1 };
                let th: i64 = tz.get(1..3).and_then(|t| t.parse().ok()).ok_or_else(bad)?;
                let tm: i64 = tz.get(4..6).and_then(|t| t.parse().ok()).ok_or_else(bad)?;
                secs -= sign * (th * 3_600 + tm * 60);
            }
            _ => return Err(bad()),
        }
    }
    u64::try_from(secs).map(|s| s * 1_000).map_err(|_| bad())
}

/// Unix milliseconds as an RFC 3339 UTC time (`2026-11-23T17:20:00Z`).
pub fn format_datetime(ms: u64) -> String {
    let secs = i64::try_from(ms / 1_000).unwrap_or(i64::MAX / 2);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3_600, rem % 3_600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_format_round_trip() {
        assert_eq!(parse_datetime("1970-01-01").unwrap(), 0);
        assert_eq!(parse_datetime("2026-11-23T17:20:00Z").unwrap(), 1_795_454_400_000);
        assert_eq!(parse_datetime("2026-11-23T19:20:00+02:00").unwrap(), 1_795_454_400_000);
        assert_eq!(format_datetime(1_795_454_400_000), "2026-11-23T17:20:00Z");
        assert_eq!(format_datetime(951_782_400_000), "2000-02-29T00:00:00Z");
        assert!(parse_datetime("2026-13-01").is_err() && parse_datetime("tomorrow").is_err());
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert!(parse_duration("3 fortnights").is_err());
    }
}
