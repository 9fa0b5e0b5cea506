//! Durations with explicit units: `250us`, `50ms`, `4s`, `2m`, `1h`, and sums such as `1s 500ms`.

use std::time::Duration;

/// Parses a duration that carries a unit. A bare number is refused: it is the classic source of
/// "was that seconds or milliseconds?" mistakes the seeds show.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; write e.g. 50ms".into());
    }
    if t.parse::<f64>().is_ok() {
        return Err(format!("`{t}` has no unit; write e.g. {t}ms or {t}s"));
    }
    // Decimal forms such as `0.5s` are common in hand-written files; humantime takes integers only.
    if let Some((num, unit)) = split_decimal(t) {
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "`{t}`: unknown unit `{unit}` (use us, ms, s, m or h)"
                ))
            }
        };
        let secs = num * scale;
        if !(0.0..=1e9).contains(&secs) {
            return Err(format!("`{t}` is out of range"));
        }
        return Ok(Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("`{t}` is not a duration ({e}); write e.g. 50ms"))
}

fn split_decimal(t: &str) -> Option<(f64, &str)> {
    let idx = t.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = t.split_at(idx);
    if !num.contains('.') {
        return None;
    }
    Some((num.parse().ok()?, unit.trim()))
}

/// Formats with the largest unit that keeps the value exact, so `5ms` stays `5ms` on a round trip.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0ms".into()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

/// serde adapter: durations as unit strings.
pub(crate) mod serde_dur {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(f64),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) => super::parse_duration(&s).map_err(serde::de::Error::custom),
            Raw::N(n) => Err(serde::de::Error::custom(format!(
                "`{n}` has no unit; write a string such as \"{n}ms\" or \"{n}s\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_round_trip() {
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("4s").unwrap(), Duration::from_secs(4));
        assert_eq!(parse_duration("0.05s").unwrap(), Duration::from_millis(50));
        assert_eq!(
            parse_duration("1.5ms").unwrap(),
            Duration::from_micros(1500)
        );
        for s in ["250us", "50ms", "4s", "1500us", "0ms"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("1.5 fortnights")
            .unwrap_err()
            .contains("unknown unit"));
    }
}
