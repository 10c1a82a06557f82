//! Money, dates and times as people read and type them: micro-USD shown as dollars, dollars
//! read without floats, Unix milliseconds as UTC times, a date field as its UTC midnight.

/// Micro-USD as dollars: `$1.234567` trimmed to cents when whole cents, else to the micro.
pub fn usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let (dollars, frac) = (m / 1_000_000, m % 1_000_000);
    if frac % 10_000 == 0 {
        format!("{sign}${dollars}.{:02}", frac / 10_000)
    } else {
        let digits = format!("{frac:06}");
        format!("{sign}${dollars}.{}", digits.trim_end_matches('0'))
    }
}

/// `12.5` dollars as 12500000 micro-USD (at most six decimals, no float).
pub fn dollars_to_micros(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not an amount of dollars (e.g. 25 or 2.50)");
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty()
        || frac.len() > 6
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    let frac: i64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .ok_or_else(bad)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time in milliseconds.
pub fn utc_time(ms: i64) -> String {
    let s = ms.div_euclid(1000);
    let (days, secs) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        crate::ledger::day_of(days),
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// `YYYY-MM-DD` as Unix ms at 00:00 UTC (a date input's value).
pub fn date_ms(date: &str) -> Option<i64> {
    let mut parts = date.split('-');
    let (y, m, d): (i64, i64, i64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    if parts.next().is_some() || !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=days_in[(m - 1) as usize]).contains(&d) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400_000)
}

#[cfg(test)]
mod tests {
    use super::{date_ms, dollars_to_micros, usd, utc_time};

    #[test]
    fn dollars_are_exact() {
        assert_eq!(usd(10_000_000), "$10.00");
        assert_eq!(usd(1_500_000), "$1.50");
        assert_eq!(usd(1_234_567), "$1.234567");
        assert_eq!(usd(50), "$0.00005");
        assert_eq!(usd(-2_000_000), "-$2.00");
        assert_eq!(usd(0), "$0.00");
    }
    #[test]
    fn dates_are_utc_midnights() {
        assert_eq!(date_ms("1970-01-01"), Some(0));
        assert_eq!(date_ms("2026-12-07"), Some(1_796_601_600_000));
        assert_eq!(date_ms("2024-02-29"), Some(1_709_164_800_000));
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-00-10",
            "26-1-1x",
            "",
            "2026-01-01-01",
        ] {
            assert_eq!(date_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn dollars_are_read_without_floats() {
        assert_eq!(dollars_to_micros("25"), Ok(25_000_000));
        assert_eq!(dollars_to_micros("2.5"), Ok(2_500_000));
        assert_eq!(dollars_to_micros("0.000001"), Ok(1));
        for bad in ["", "-1", "1.0000001", "1e3", "abc", "1.2.3"] {
            assert!(dollars_to_micros(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(1_796_658_430_531), "2026-12-07T15:47:10Z");
    }
}
