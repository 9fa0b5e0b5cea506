//! The target language shared by `loadgen --fail-on` and `tuner search --target`:
//! `p95<4s`, `p99.9<=250ms`, `mean<20ms`, `max<2s`, `error_rate<0.1%`, `throughput>=100`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// What a target constrains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// A latency percentile, 0 < p < 100 (p95 → 95.0).
    Percentile(f64),
    /// Mean latency.
    Mean,
    /// Largest latency.
    Max,
    /// Failed requests ÷ all requests (a fraction; written in %).
    ErrorRate,
    /// Successful requests per second.
    Throughput,
}

/// Comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Op {
    fn apply(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
        }
    }
    fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// One parsed condition; `value` is in seconds (latency), a fraction (error rate) or requests/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// What is measured.
    pub metric: Metric,
    /// How it compares.
    pub op: Op,
    /// The bound, in base units.
    pub value: f64,
    /// The text as written, for reports.
    pub text: String,
}

/// A parse error that points at the offending part of the text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}\n  {input}\n  {caret}")]
pub struct ParseError {
    /// What is wrong.
    pub message: String,
    /// The whole text.
    pub input: String,
    /// `^^^` under the offending part.
    pub caret: String,
}

fn perr(input: &str, at: usize, len: usize, message: String) -> ParseError {
    ParseError {
        message,
        input: input.to_string(),
        caret: format!("{}{}", " ".repeat(at), "^".repeat(len.max(1))),
    }
}

/// The statistics a target is checked against.
pub trait Observed {
    /// Latency at quantile `q` (0..1), seconds.
    fn latency_quantile(&self, q: f64) -> f64;
    /// Mean latency, seconds.
    fn latency_mean(&self) -> f64;
    /// Largest latency, seconds.
    fn latency_max(&self) -> f64;
    /// Failed ÷ all.
    fn error_rate(&self) -> f64;
    /// Successes per second.
    fn throughput(&self) -> f64;
}

impl Target {
    /// Parses one condition.
    pub fn parse(text: &str) -> Result<Target, ParseError> {
        let t = text.trim();
        let lead = text.len() - text.trim_start().len();
        let op_at = t.find(['<', '>']).ok_or_else(|| {
            perr(
                text,
                lead,
                t.len(),
                "expected a comparison such as p95<4s (operators: < <= > >=)".into(),
            )
        })?;
        let (op, op_len) = match (&t[op_at..op_at + 1], t[op_at + 1..].starts_with('=')) {
            ("<", true) => (Op::Le, 2),
            ("<", false) => (Op::Lt, 1),
            (">", true) => (Op::Ge, 2),
            _ => (Op::Gt, 1),
        };
        let name = t[..op_at].trim();
        let val = t[op_at + op_len..].trim();
        let val_at = lead
            + op_at
            + op_len
            + (t[op_at + op_len..].len() - t[op_at + op_len..].trim_start().len());
        let metric = match name {
            "mean" | "avg" => Metric::Mean,
            "max" => Metric::Max,
            "error_rate" | "errors" => Metric::ErrorRate,
            "throughput" | "rps" => Metric::Throughput,
            n if n.starts_with('p') => {
                let p: f64 = n[1..].parse().map_err(|_| {
                    perr(text, lead, name.len(), format!("`{n}` is not a percentile; write e.g. p50, p95, p99.9"))
                })?;
                if !(p > 0.0 && p < 100.0) {
                    return Err(perr(text, lead, name.len(), format!("percentile {p} must be between 0 and 100")));
                }
                Metric::Percentile(p)
            }
            "" => return Err(perr(text, lead, 1, "missing the statistic before the operator (p95, mean, max, error_rate, throughput)".into())),
            other => {
                return Err(perr(
                    text,
                    lead,
                    other.len(),
                    format!("unknown statistic `{other}`; use p50…p99.9, mean, max, error_rate or throughput"),
                ))
            }
        };
        if val.is_empty() {
            return Err(perr(
                text,
                val_at,
                1,
                "missing the value after the operator".into(),
            ));
        }
        let value = match metric {
            Metric::ErrorRate => {
                let num = val.strip_suffix('%').ok_or_else(|| {
                    perr(
                        text,
                        val_at,
                        val.len(),
                        format!("error_rate is a percentage: write `{val}%`"),
                    )
                })?;
                num.trim().parse::<f64>().map_err(|_| {
                    perr(
                        text,
                        val_at,
                        val.len(),
                        format!("`{val}` is not a percentage"),
                    )
                })? / 100.0
            }
            Metric::Throughput => {
                let num = val.trim_end_matches("rps").trim_end_matches("/s").trim();
                num.parse::<f64>().map_err(|_| {
                    perr(
                        text,
                        val_at,
                        val.len(),
                        format!("`{val}` is not a rate; write e.g. 100 or 100rps"),
                    )
                })?
            }
            _ => parse_latency(val)
                .map_err(|m| perr(text, val_at, val.len(), m))?
                .as_secs_f64(),
        };
        if !value.is_finite() || value < 0.0 {
            return Err(perr(
                text,
                val_at,
                val.len(),
                "the value must be a non-negative number".into(),
            ));
        }
        Ok(Target {
            metric,
            op,
            value,
            text: t.to_string(),
        })
    }

    /// The observed value this target compares.
    pub fn observe(&self, o: &dyn Observed) -> f64 {
        match self.metric {
            Metric::Percentile(p) => o.latency_quantile(p / 100.0),
            Metric::Mean => o.latency_mean(),
            Metric::Max => o.latency_max(),
            Metric::ErrorRate => o.error_rate(),
            Metric::Throughput => o.throughput(),
        }
    }

    /// True when the condition holds on `o`.
    pub fn holds(&self, o: &dyn Observed) -> bool {
        self.op.apply(self.observe(o), self.value)
    }

    /// True for targets that an upper bound on latency or errors expresses (they get worse with load).
    pub fn is_upper_bound(&self) -> bool {
        matches!(self.op, Op::Lt | Op::Le)
    }

    /// Formats an observed value in this target's units.
    pub fn format_value(&self, v: f64) -> String {
        match self.metric {
            Metric::ErrorRate => format!("{:.3}%", v * 100.0),
            Metric::Throughput => format!("{v:.1}/s"),
            _ => format_secs(v),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self.metric {
            Metric::Percentile(p) => format!("p{p}"),
            Metric::Mean => "mean".into(),
            Metric::Max => "max".into(),
            Metric::ErrorRate => "error_rate".into(),
            Metric::Throughput => "throughput".into(),
        };
        write!(
            f,
            "{m}{}{}",
            self.op.as_str(),
            self.format_value(self.value)
        )
    }
}

/// Parses `250us`, `20ms`, `4s`, `1.5s`.
pub fn parse_latency(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let idx = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{v}` has no unit; write e.g. {v}ms"))?;
    let (num, unit) = v.split_at(idx);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{v}` is not a number with a unit"))?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        u => return Err(format!("unknown unit `{u}` in `{v}`; use us, ms or s")),
    };
    Ok(Duration::from_secs_f64(n * scale))
}

/// Human form of seconds: `850us`, `12.3ms`, `4.02s`.
pub fn format_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0}us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2}ms", s * 1e3)
    } else {
        format!("{s:.3}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct O;
    impl Observed for O {
        fn latency_quantile(&self, q: f64) -> f64 {
            q // p95 = 0.95s
        }
        fn latency_mean(&self) -> f64 {
            0.5
        }
        fn latency_max(&self) -> f64 {
            2.0
        }
        fn error_rate(&self) -> f64 {
            0.002
        }
        fn throughput(&self) -> f64 {
            120.0
        }
    }

    #[test]
    fn parses_the_grammar() {
        let t = Target::parse("p95<4s").unwrap();
        assert_eq!(
            (t.metric, t.op, t.value),
            (Metric::Percentile(95.0), Op::Lt, 4.0)
        );
        assert_eq!(Target::parse(" p99.9 <= 250ms").unwrap().value, 0.25);
        assert_eq!(Target::parse("p50<250us").unwrap().value, 250e-6);
        assert_eq!(Target::parse("error_rate<0.1%").unwrap().value, 0.001);
        assert_eq!(Target::parse("throughput>=100rps").unwrap().op, Op::Ge);
        assert_eq!(Target::parse("mean<1.5s").unwrap().metric, Metric::Mean);
        assert!(Target::parse("p95<4s").unwrap().holds(&O));
        assert!(!Target::parse("p95<900ms").unwrap().holds(&O));
        assert!(!Target::parse("error_rate<0.1%").unwrap().holds(&O));
        assert!(Target::parse("throughput>100").unwrap().holds(&O));
        assert!(Target::parse("max>1s").unwrap().holds(&O));
    }

    #[test]
    fn errors_point_at_the_offending_text() {
        let e = Target::parse("p95<4x").unwrap_err();
        assert!(e.message.contains("unknown unit `x`"), "{e}");
        assert_eq!(e.caret, "    ^^");
        let e = Target::parse("q95<4s").unwrap_err();
        assert!(e.message.contains("unknown statistic `q95`"));
        assert_eq!(e.caret, "^^^");
        let e = Target::parse("p95 4s").unwrap_err();
        assert!(e.message.contains("expected a comparison"));
        let e = Target::parse("error_rate<0.1").unwrap_err();
        assert!(e.message.contains("percentage"));
        let e = Target::parse("p100<1s").unwrap_err();
        assert!(e.message.contains("between 0 and 100"));
        let e = Target::parse("p95<").unwrap_err();
        assert!(e.message.contains("missing the value"));
        assert!(Target::parse("p95<4")
            .unwrap_err()
            .message
            .contains("no unit"));
    }
}
