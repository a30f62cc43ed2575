//! Parsers for the time formats rate-limit headers use: Go-style durations ("6m0s", "20ms"),
//! HTTP dates ("Sun, 06 Nov 1994 08:49:37 GMT") and RFC 3339 timestamps
//! ("2024-05-01T12:00:30Z"). Pure functions; absolute times come back as seconds since the
//! Unix epoch so a caller can subtract the response's `date` header from them.

use std::time::Duration;

/// Parses a Go-style duration: one or more `<number><unit>` parts with units `h`, `m`, `s`,
/// `ms`, `us`/`µs`, `ns` ("6m0s", "1s", "20ms", "1h2m3.5s"). A bare number counts as seconds.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds);
    }
    let mut total_seconds = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_end == 0 {
            return None;
        }
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total_seconds += number * seconds_per_unit;
        rest = &rest[unit_end..];
    }
    seconds_to_duration(total_seconds)
}

/// The longest duration a header can name: anything longer (up to `1e308` seconds, or an
/// overflowing sum of parts) is taken as this, so arithmetic on it (`now + wait`, jitter, an
/// `Instant` deadline, milliseconds as `i64`) can never overflow, and a caller comparing it
/// with a sane cap still sees that it is far too long.
pub const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Converts non-negative finite seconds to a `Duration`, clamped to [`LONGEST`]. Negative
/// and non-finite values (NaN, an overflow to infinity) are not durations.
pub fn seconds_to_duration(seconds: f64) -> Option<Duration> {
    if !(seconds.is_finite() && seconds >= 0.0) {
        return None;
    }
    Some(Duration::try_from_secs_f64(seconds).unwrap_or(LONGEST).min(LONGEST))
}

/// Parses an IMF-fixdate HTTP date ("Sun, 06 Nov 1994 08:49:37 GMT") to Unix seconds.
pub fn parse_http_date(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let _weekday = parts.next()?;
    let day: u32 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let seconds_of_day = parse_clock(parts.next()?)?;
    if parts.next()? != "GMT" {
        return None;
    }
    Some(days_from_civil(year, month, day)? as f64 * 86_400.0 + seconds_of_day)
}

/// Parses an RFC 3339 timestamp ("2024-05-01T12:00:30.5Z", "...+02:00") to Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<f64> {
    let text = text.trim();
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut date_parts = date.split('-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    let (clock, offset_seconds) = if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        (clock, 0.0)
    } else {
        let sign_at = time.rfind(['+', '-'])?;
        let (clock, offset) = time.split_at(sign_at);
        let sign = if offset.starts_with('-') { -1.0 } else { 1.0 };
        let (hours, minutes) = offset[1..].split_once(':')?;
        let hours: f64 = hours.parse().ok()?;
        let minutes: f64 = minutes.parse().ok()?;
        (clock, sign * (hours * 3600.0 + minutes * 60.0))
    };
    let seconds_of_day = parse_clock(clock)?;
    Some(days_from_civil(year, month, day)? as f64 * 86_400.0 + seconds_of_day - offset_seconds)
}

/// "HH:MM:SS(.fff)" to seconds of the day.
fn parse_clock(text: &str) -> Option<f64> {
    let mut parts = text.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || hours >= 24.0 || minutes >= 60.0 || seconds >= 61.0 {
        return None;
    }
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_go_duration("0.25"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("5 parsecs"), None);
        assert_eq!(parse_go_duration("ms"), None);
        assert_eq!(parse_go_duration("-3s"), None);
    }

    #[test]
    fn huge_durations_clamp_instead_of_panicking() {
        assert_eq!(parse_go_duration("99999999999999999999s"), Some(LONGEST));
        assert_eq!(parse_go_duration("1e20"), Some(LONGEST));
        assert_eq!(parse_go_duration("1e308"), Some(LONGEST));
        assert_eq!(parse_go_duration("99999999999999999999h99999999999999999999h"), Some(LONGEST));
        assert_eq!(seconds_to_duration(f64::INFINITY), None);
        assert_eq!(seconds_to_duration(f64::NAN), None);
        assert_eq!(seconds_to_duration(1e20 / 1000.0), Some(LONGEST));
    }

    #[test]
    fn http_date_matches_known_epoch_seconds() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777.0)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 CET"), None);
    }

    #[test]
    fn rfc3339_with_zone_and_fraction() {
        assert_eq!(parse_rfc3339("1970-01-02T00:00:00Z"), Some(86_400.0));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:30.5Z"),
            Some(1_714_564_830.5)
        );
        assert_eq!(
            parse_rfc3339("2024-05-01T14:00:30+02:00"),
            Some(1_714_564_830.0)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
