//! The search space: knobs with ranges, log or linear scale, integer/float/duration/choice, mapped
//! to the unit box [0, 1]^d that the optimizers search.

use profiles::{format_duration, parse_duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// How a knob's values are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scale {
    /// Equal steps.
    Linear,
    /// Equal ratios (batch sizes, timeouts): the default for ranges spanning decades.
    #[default]
    Log,
}

/// One knob's domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Domain {
    /// Whole numbers in [min, max].
    Int {
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: i64,
        /// Spacing.
        #[serde(default)]
        scale: Scale,
    },
    /// Reals in [min, max].
    Float {
        /// Smallest value.
        min: f64,
        /// Largest value.
        max: f64,
        /// Spacing.
        #[serde(default)]
        scale: Scale,
    },
    /// Durations in [min, max], written with units (`"500us"`, `"100ms"`).
    Duration {
        /// Shortest.
        min: String,
        /// Longest.
        max: String,
        /// Spacing.
        #[serde(default)]
        scale: Scale,
    },
    /// One of a list.
    Choice {
        /// The options, as the profile writes them.
        choices: Vec<String>,
    },
}

/// A whole-number knob on a log scale, the shape of every default space's integer knobs.
fn log_int(min: i64, max: i64) -> Domain {
    Domain::Int {
        min,
        max,
        scale: Scale::Log,
    }
}

/// A concrete knob value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// Integer knob.
    Int(i64),
    /// Float knob.
    Float(f64),
    /// Duration or choice, as the profile writes it.
    Text(String),
}

impl Value {
    /// The JSON form `PUT /config` takes.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Int(i) => serde_json::json!(i),
            Value::Float(f) => serde_json::json!(f),
            Value::Text(s) => serde_json::json!(s),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:.4}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// A point in knob space: knob name → value, in a stable order.
pub type Knobs = BTreeMap<String, Value>;

/// A canonical string for a point, used as the journal and cache key.
pub fn key(k: &Knobs) -> String {
    k.iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The knobs searched, in a fixed order (the box's axes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Space {
    /// Knob name → domain; BTreeMap order defines the axes.
    pub knobs: BTreeMap<String, Domain>,
}

/// A space file or definition that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("search space: {0}")]
pub struct SpaceError(pub String);

fn to_unit(v: f64, min: f64, max: f64, scale: Scale) -> f64 {
    if max <= min {
        return 0.5;
    }
    let u = match scale {
        Scale::Linear => (v - min) / (max - min),
        Scale::Log => (v.ln() - min.ln()) / (max.ln() - min.ln()),
    };
    u.clamp(0.0, 1.0)
}

fn from_unit(u: f64, min: f64, max: f64, scale: Scale) -> f64 {
    let u = u.clamp(0.0, 1.0);
    match scale {
        Scale::Linear => min + u * (max - min),
        Scale::Log => (min.ln() + u * (max.ln() - min.ln())).exp(),
    }
}

fn dur_secs(s: &str, knob: &str) -> Result<f64, SpaceError> {
    parse_duration(s)
        .map(|d| d.as_secs_f64())
        .map_err(|e| SpaceError(format!("{knob}: {e}")))
}

impl Space {
    /// The default space: batch size, wait timeout, concurrent batches, queue size, token budget.
    pub fn default_space() -> Space {
        let mut k = BTreeMap::new();
        k.insert("max_batch_size".into(), log_int(1, 128));
        k.insert(
            "batch_wait_timeout".into(),
            Domain::Duration {
                min: "500us".into(),
                max: "100ms".into(),
                scale: Scale::Log,
            },
        );
        k.insert("max_concurrent_batches".into(), log_int(1, 8));
        k.insert("max_queue_size".into(), log_int(16, 4096));
        k.insert("max_batch_tokens".into(), log_int(1024, 65536));
        Space { knobs: k }
    }

    /// The default space of a generation server: running sequences, the prefill token budget
    /// per step, the batch wait, the KV budget and the queue size.
    pub fn generation_space() -> Space {
        let mut k = BTreeMap::new();
        k.insert("max_batch_size".into(), log_int(1, 64));
        // At least the default max_input_tokens (512): the profile's rule that one prompt fits.
        k.insert("max_batch_tokens".into(), log_int(512, 8192));
        k.insert(
            "batch_wait_timeout".into(),
            Domain::Duration {
                min: "500us".into(),
                max: "100ms".into(),
                scale: Scale::Log,
            },
        );
        k.insert("kv_cache_tokens".into(), log_int(1024, 65536));
        k.insert("max_queue_size".into(), log_int(16, 1024));
        Space { knobs: k }
    }

    /// The client side of a pipeline: its cap on requests in flight (the rate is what every
    /// trial measures).
    pub fn client_space() -> Space {
        let mut k = BTreeMap::new();
        k.insert(crate::server::CLIENT_CONCURRENCY.into(), log_int(1, 256));
        Space { knobs: k }
    }

    /// Parses a space file (a TOML table per knob) and checks it.
    pub fn from_toml(text: &str) -> Result<Space, SpaceError> {
        let knobs: BTreeMap<String, Domain> =
            toml::from_str(text).map_err(|e| SpaceError(e.to_string()))?;
        let s = Space { knobs };
        s.check()?;
        Ok(s)
    }

    /// Every knob is a runtime knob (or the client's concurrency) and every range is sound.
    pub fn check(&self) -> Result<(), SpaceError> {
        for name in self.knobs.keys() {
            if !profiles::KNOBS.contains(&name.as_str())
                && name != crate::server::CLIENT_CONCURRENCY
            {
                return Err(SpaceError(format!(
                    "unknown knob `{name}`; knobs are: {}, {}",
                    profiles::KNOBS.join(", "),
                    crate::server::CLIENT_CONCURRENCY
                )));
            }
        }
        self.check_shape()
    }

    /// Every range is sound, whatever the knobs are called (an adapter's server knobs).
    pub fn check_shape(&self) -> Result<(), SpaceError> {
        if self.knobs.is_empty() {
            return Err(SpaceError("no knobs to search".into()));
        }
        for (name, d) in &self.knobs {
            let (lo, hi, scale) = match d {
                Domain::Int { min, max, scale } => (*min as f64, *max as f64, *scale),
                Domain::Float { min, max, scale } => (*min, *max, *scale),
                Domain::Duration { min, max, scale } => {
                    (dur_secs(min, name)?, dur_secs(max, name)?, *scale)
                }
                Domain::Choice { choices } => {
                    if choices.is_empty() {
                        return Err(SpaceError(format!("{name}: choices is empty")));
                    }
                    continue;
                }
            };
            if lo > hi {
                return Err(SpaceError(format!("{name}: min {lo} is above max {hi}")));
            }
            if scale == Scale::Log && lo <= 0.0 {
                return Err(SpaceError(format!(
                    "{name}: a log scale needs min > 0 (got {lo})"
                )));
            }
        }
        Ok(())
    }

    /// Number of axes.
    pub fn dims(&self) -> usize {
        self.knobs.len()
    }

    /// Unit-box point → knob values (integers rounded, durations to whole microseconds).
    pub fn decode(&self, u: &[f64]) -> Knobs {
        self.knobs
            .iter()
            .zip(u)
            .map(|((name, d), &x)| {
                let v = match d {
                    Domain::Int { min, max, scale } => Value::Int(
                        (from_unit(x, *min as f64, *max as f64, *scale).round() as i64)
                            .clamp(*min, *max),
                    ),
                    Domain::Float { min, max, scale } => {
                        Value::Float(from_unit(x, *min, *max, *scale))
                    }
                    Domain::Duration { min, max, scale } => {
                        let (lo, hi) = (
                            dur_secs(min, name).unwrap_or(0.0),
                            dur_secs(max, name).unwrap_or(0.0),
                        );
                        let us = (from_unit(x, lo, hi, *scale) * 1e6).round() as u64;
                        Value::Text(format_duration(Duration::from_micros(us)))
                    }
                    Domain::Choice { choices } => {
                        let i = ((x.clamp(0.0, 1.0) * choices.len() as f64) as usize)
                            .min(choices.len() - 1);
                        Value::Text(choices[i].clone())
                    }
                };
                (name.clone(), v)
            })
            .collect()
    }

    /// Knob values → unit-box point (inverse of `decode` up to rounding). Missing knobs map to 0.5.
    pub fn encode(&self, k: &Knobs) -> Vec<f64> {
        self.knobs
            .iter()
            .map(|(name, d)| match (d, k.get(name)) {
                (Domain::Int { min, max, scale }, Some(Value::Int(v))) => {
                    to_unit(*v as f64, *min as f64, *max as f64, *scale)
                }
                (Domain::Float { min, max, scale }, Some(Value::Float(v))) => {
                    to_unit(*v, *min, *max, *scale)
                }
                (Domain::Duration { min, max, scale }, Some(Value::Text(s))) => {
                    let v = parse_duration(s).map(|d| d.as_secs_f64()).unwrap_or(0.0);
                    to_unit(
                        v,
                        dur_secs(min, name).unwrap_or(0.0),
                        dur_secs(max, name).unwrap_or(0.0),
                        *scale,
                    )
                }
                (Domain::Choice { choices }, Some(Value::Text(s))) => {
                    let i = choices.iter().position(|c| c == s).unwrap_or(0);
                    (i as f64 + 0.5) / choices.len() as f64
                }
                _ => 0.5,
            })
            .collect()
    }

    /// Values of these knobs in a profile (the starting point of local searches).
    pub fn from_profile(&self, p: &profiles::Profile) -> Knobs {
        let v = serde_json::to_value(p).expect("profiles serialize");
        self.knobs
            .iter()
            .filter_map(|(name, d)| {
                let x = v.get(name)?;
                let val = match d {
                    Domain::Int { .. } => Value::Int(x.as_i64()?),
                    Domain::Float { .. } => Value::Float(x.as_f64()?),
                    _ => Value::Text(x.as_str()?.to_string()),
                };
                Some((name.clone(), val))
            })
            .collect()
    }

    /// Per-axis levels for a grid of about `levels` values per knob (choices: all of them).
    pub fn grid_levels(&self, levels: usize) -> Vec<Vec<f64>> {
        self.knobs
            .values()
            .map(|d| match d {
                Domain::Choice { choices } => (0..choices.len())
                    .map(|i| (i as f64 + 0.5) / choices.len() as f64)
                    .collect(),
                Domain::Int { min, max, .. } if ((max - min + 1) as usize) < levels => {
                    let n = (max - min + 1) as usize;
                    (0..n)
                        .map(|i| {
                            if n == 1 {
                                0.5
                            } else {
                                i as f64 / (n - 1) as f64
                            }
                        })
                        .collect()
                }
                _ => (0..levels)
                    .map(|i| {
                        if levels == 1 {
                            0.5
                        } else {
                            i as f64 / (levels - 1) as f64
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_space_round_trips_through_the_unit_box() {
        let s = Space::default_space();
        s.check().unwrap();
        for u in [[0.0; 5], [1.0; 5], [0.37, 0.81, 0.5, 0.12, 0.66]] {
            let k = s.decode(&u);
            let again = s.decode(&s.encode(&k));
            assert_eq!(k, again, "{u:?}");
        }
        let k = s.decode(&[0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(k["max_batch_size"], Value::Int(1));
        assert_eq!(k["batch_wait_timeout"], Value::Text("500us".into()));
        let k = s.decode(&[1.0; 5]);
        assert_eq!(k["max_batch_size"], Value::Int(128));
        assert_eq!(k["batch_wait_timeout"], Value::Text("100ms".into()));
        // Log scale: the middle of [1, 128] is about 11, not 64.
        let mid = s.decode(&[0.5; 5]);
        assert_eq!(mid["max_batch_size"], Value::Int(11));
    }

    #[test]
    fn space_files_parse_and_are_checked() {
        let s = Space::from_toml(
            r#"
            [max_batch_size]
            type = "int"
            min = 1
            max = 64
            [batch_wait_timeout]
            type = "duration"
            min = "1ms"
            max = "50ms"
            scale = "linear"
            [overflow]
            type = "choice"
            choices = ["reject", "wait"]
            "#,
        )
        .unwrap();
        assert_eq!(s.dims(), 3);
        let k = s.decode(&[0.2, 0.9, 0.99]);
        assert_eq!(s.decode(&s.encode(&k)), k);
        assert_eq!(k["overflow"], Value::Text("wait".into()));
        assert!(Space::from_toml("[nope]\ntype = \"int\"\nmin = 1\nmax = 2")
            .unwrap_err()
            .0
            .contains("unknown knob `nope`"));
        assert!(
            Space::from_toml("[max_batch_size]\ntype = \"int\"\nmin = 0\nmax = 2")
                .unwrap_err()
                .0
                .contains("log scale")
        );
        assert!(Space::from_toml(
            "[max_batch_size]\ntype = \"int\"\nmin = 9\nmax = 2\nscale=\"linear\""
        )
        .unwrap_err()
        .0
        .contains("above max"));
    }

    #[test]
    fn starting_point_comes_from_a_profile() {
        let s = Space::default_space();
        let k = s.from_profile(&profiles::Profile::default());
        assert_eq!(k["max_batch_size"], Value::Int(32));
        assert_eq!(k["batch_wait_timeout"], Value::Text("5ms".into()));
        assert_eq!(s.decode(&s.encode(&k)), k);
    }
}
