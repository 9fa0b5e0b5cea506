//! The target language shared by `loadgen --fail-on` and `tuner search --target`:
//! `p95<4s`, `p99.9<=250ms`, `mean<20ms`, `max<2s`, `error_rate<0.1%`, `throughput>=100`, and
//! for streamed generation `ttft_p95<500ms`, `tpot_p95<50ms`, `itl_p99<100ms`, `e2e_p95<4s`
//! (the same as `p95<4s`: end-to-end), `goodput>=2` (requests/s meeting every per-request limit).

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
    /// A percentile of a streamed generation's token timing.
    Token(TokenMetric, f64),
    /// Requests per second whose every per-request limit held (see [`GoodputLimits`]).
    Goodput,
}

/// Token-level timings of a streamed generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenMetric {
    /// Time to first token, from the intended send.
    Ttft,
    /// Time per output token after the first, per request.
    Tpot,
    /// Gaps between token-carrying events.
    Itl,
}

impl TokenMetric {
    fn name(self) -> &'static str {
        match self {
            TokenMetric::Ttft => "ttft",
            TokenMetric::Tpot => "tpot",
            TokenMetric::Itl => "itl",
        }
    }
}

/// Per-request limits a request must all meet to count towards goodput (DistServe's and vLLM's
/// definition); each is the bound of the targets on that metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GoodputLimits {
    /// Time to first token.
    pub ttft: Option<Duration>,
    /// Time per output token.
    pub tpot: Option<Duration>,
    /// End to end.
    pub e2e: Option<Duration>,
}

impl GoodputLimits {
    /// The limits implied by upper-bound targets on TTFT, TPOT and end-to-end latency (the
    /// tightest of each).
    pub fn from_targets(targets: &[Target]) -> GoodputLimits {
        let mut g = GoodputLimits::default();
        for t in targets.iter().filter(|t| t.is_upper_bound()) {
            let slot = match t.metric {
                Metric::Token(TokenMetric::Ttft, _) => &mut g.ttft,
                Metric::Token(TokenMetric::Tpot, _) => &mut g.tpot,
                Metric::Percentile(_) | Metric::Max => &mut g.e2e,
                _ => continue,
            };
            let d = Duration::from_secs_f64(t.value);
            *slot = Some(slot.map_or(d, |x| x.min(d)));
        }
        g
    }

    /// True when no limit is set (goodput then equals throughput).
    pub fn is_empty(&self) -> bool {
        self.ttft.is_none() && self.tpot.is_none() && self.e2e.is_none()
    }
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
    /// A token timing at quantile `q`, seconds; `None` when the run did not stream.
    fn token_quantile(&self, _m: TokenMetric, _q: f64) -> Option<f64> {
        None
    }
    /// Requests per second meeting every per-request limit; `None` when not measured.
    fn goodput(&self) -> Option<f64> {
        None
    }
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
            "goodput" => Metric::Goodput,
            n if n.contains('_') && !n.starts_with("error") => {
                let (stat, pct) = n.split_once('_').expect("has an underscore");
                let p: f64 = pct.strip_prefix('p').and_then(|p| p.parse().ok()).ok_or_else(|| {
                    perr(text, lead, name.len(), format!("`{n}`: write a percentile after the metric, e.g. {stat}_p95"))
                })?;
                if !(p > 0.0 && p < 100.0) {
                    return Err(perr(text, lead, name.len(), format!("percentile {p} must be between 0 and 100")));
                }
                match stat {
                    "ttft" => Metric::Token(TokenMetric::Ttft, p),
                    "tpot" => Metric::Token(TokenMetric::Tpot, p),
                    "itl" => Metric::Token(TokenMetric::Itl, p),
                    "e2e" => Metric::Percentile(p),
                    other => {
                        return Err(perr(text, lead, stat.len(), format!("unknown metric `{other}`; use ttft, tpot, itl or e2e")))
                    }
                }
            }
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
                    format!("unknown statistic `{other}`; use p50…p99.9, mean, max, error_rate, throughput, goodput, or ttft_/tpot_/itl_/e2e_ with a percentile"),
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
            Metric::Throughput | Metric::Goodput => {
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
            // A run that measured no token timings cannot meet a token target.
            Metric::Token(m, p) => o.token_quantile(m, p / 100.0).unwrap_or(f64::NAN),
            Metric::Goodput => o.goodput().unwrap_or(f64::NAN),
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
            Metric::Throughput | Metric::Goodput => format!("{v:.1}/s"),
            _ if v.is_nan() => "n/a (not streamed)".into(),
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
            Metric::Token(m, p) => format!("{}_p{p}", m.name()),
            Metric::Goodput => "goodput".into(),
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
        let t = Target::parse("ttft_p95<500ms").unwrap();
        assert_eq!(t.metric, Metric::Token(TokenMetric::Ttft, 95.0));
        assert!(!t.holds(&O), "no token timings: a token target cannot hold");
        assert_eq!(
            Target::parse("e2e_p95<4s").unwrap().metric,
            Metric::Percentile(95.0)
        );
        assert_eq!(Target::parse("goodput>=2").unwrap().metric, Metric::Goodput);
        assert_eq!(
            Target::parse("tpot_p99<50ms").unwrap().to_string(),
            "tpot_p99<50.00ms"
        );
        let g = GoodputLimits::from_targets(&[
            Target::parse("ttft_p95<500ms").unwrap(),
            Target::parse("ttft_p99<800ms").unwrap(),
            Target::parse("p95<4s").unwrap(),
            Target::parse("error_rate<1%").unwrap(),
        ]);
        assert_eq!(g.ttft, Some(Duration::from_millis(500)));
        assert_eq!(g.e2e, Some(Duration::from_secs(4)));
        assert_eq!(g.tpot, None);
        assert!(Target::parse("ttft_q95<1s")
            .unwrap_err()
            .message
            .contains("percentile"));
        assert!(Target::parse("ttfb_p95<1s")
            .unwrap_err()
            .message
            .contains("unknown metric"));
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
