//! The batchtune Profile: every serving knob with its unit, default and validation rule.
//!
//! A profile is the contract between the three tools: the runtime loads one, the tuner writes one,
//! and the CI gate benchmarks one. It is a flat TOML table (see `profiles/*.toml`) plus an optional
//! `[provenance]` table that records how a tuned profile was measured.
//!
//! Durations are strings with a unit (`"250us"`, `"50ms"`, `"4s"`): a bare number would be ambiguous
//! between the seeds' seconds (`BATCH_WAIT_TIMEOUT=0.05`) and milliseconds (`BATCH_WAIT_TIME_MS=50`).
#![warn(missing_docs)]

mod duration;

pub use duration::{format_duration, parse_duration};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// Errors raised while loading, overriding or validating a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML or JSON did not match the schema (unknown knob, wrong type, bad duration).
    #[error("{0}")]
    Parse(String),
    /// One or more knobs break their rule; every violation is listed.
    #[error("{}", .0.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Violation>),
    /// A hot reload tried to change knobs that need a restart.
    #[error("{} cannot change on a running server (restart it with the new profile): {}",
        if .0.len() == 1 { "this knob" } else { "these knobs" }, .0.join(", "))]
    RestartRequired(Vec<String>),
}

/// `BATCHTUNE_*` variables that are not knob overrides: the runtime's and tuner's flags
/// (`--profile`, `--addr`, `--api-key`, `--max-body-bytes`, `--model`, the tuner's runtime
/// path) and two GPU diagnostics.
pub const OTHER_ENV: &[&str] = &[
    "BATCHTUNE_PROFILE",
    "BATCHTUNE_ADDR",
    "BATCHTUNE_API_KEY",
    "BATCHTUNE_MAX_BODY_BYTES",
    "BATCHTUNE_MODEL_PATH",
    "BATCHTUNE_RUNTIME",
    "BATCHTUNE_SKIP_WARMUP",
    "BATCHTUNE_SPLIT_OVERHEAD_TOKENS",
];

/// The smallest rate limit other than 0 (off): one request per 1000 s.
pub const MIN_RATE_LIMIT: f64 = 0.001;

/// One knob breaking one rule: names the knob, the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Knob name as written in the profile.
    pub knob: String,
    /// Offending value, formatted as in the profile.
    pub value: String,
    /// The rule it breaks, in words.
    pub rule: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.knob, self.value, self.rule)
    }
}

/// What to do with a request when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Answer 429 at once (seed 004's default): the client retries elsewhere or later.
    #[default]
    Reject,
    /// Hold the request for a free slot up to `queue_timeout` (or `request_timeout`, if smaller), then 429.
    Wait,
}

/// How a generation server admits new sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// New sequences join the running batch between decode steps (vLLM, TGI).
    #[default]
    Continuous,
    /// Whole-request batching (the seeds' servers): a batch of up to `max_batch_size` sequences
    /// starts together and takes no newcomers until its last sequence ends; up to
    /// `max_concurrent_batches` such batches run at once. Kept as the baseline to beat.
    /// Finished sequences leave the computation at once, so this is a stronger baseline than
    /// what the seeds run.
    Static,
    /// Static batching as HF transformers' `generate` runs it (seed 001's `llm_model` design):
    /// like `static`, and a batch's finished sequences keep being computed as padding rows
    /// until its last sequence ends. Their answers still go out when they finish, which is
    /// kinder to this baseline than `generate`, which returns the whole batch at once.
    Padded,
}

/// Numeric precision of the model weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float; the only precision every CPU kernel supports well.
    #[default]
    F32,
    /// IEEE half precision (GPU).
    F16,
    /// bfloat16 (GPU).
    Bf16,
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        })
    }
}

/// Every knob of the runtime. Field docs give unit, default and rule; `validate` enforces the rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Most inputs (texts) in one batch. Default 32; 1..=4096.
    pub max_batch_size: usize,
    /// Most tokens in one batch, counted as inputs × longest input (the padded size the model
    /// computes). Default 16384; at least `max_input_tokens`, so any single valid input fits.
    pub max_batch_tokens: usize,
    /// Longest the oldest queued input waits for a batch to fill. Default 5ms; at most 10s.
    #[serde(with = "duration::serde_dur")]
    pub batch_wait_timeout: Duration,
    /// Batches computed at once, across all devices. Default 2; 1..=1024.
    pub max_concurrent_batches: usize,
    /// Inputs waiting for a batch before admission says no. Default 1024; 1..=1,000,000.
    pub max_queue_size: usize,
    /// What a full queue does to a new request: `reject` (429) or `wait` (up to the smaller of `queue_timeout` and `request_timeout`).
    pub overflow: Overflow,
    /// Longest a request waits for queue space when `overflow = "wait"`. Default 30s; at most 1h.
    #[serde(with = "duration::serde_dur")]
    pub queue_timeout: Duration,
    /// Deadline from arrival to answer; a queued input past it gets 504 and is never computed.
    /// Default 30s; 1ms..=1h.
    #[serde(with = "duration::serde_dur")]
    pub request_timeout: Duration,
    /// Admitted requests per second (token bucket); 0 turns the limiter off. Default 0; at most 1e6.
    pub rate_limit: f64,
    /// Requests the limiter lets through at once; 0 means `ceil(rate_limit)`. Default 0.
    pub rate_burst: u32,
    /// Most inputs in one request's `input` array. Default 256; 1..=65,536.
    pub max_inputs_per_request: usize,
    /// Most tokens in one input, special tokens included. Default 512 (MiniLM's position table).
    pub max_input_tokens: usize,
    /// Generation: the default and the upper limit of a request's `max_tokens` (seed 001's
    /// `MAX_NEW_TOKENS`). Default 256; 1..=32768.
    pub max_new_tokens: usize,
    /// Generation: KV-cache budget per replica, in tokens. A sequence reserves prompt +
    /// `max_tokens` when it starts and keeps it until it ends, so the budget is never exceeded
    /// and nothing is preempted; waiting sequences start when enough is free. Default 32768;
    /// 16..=16,777,216.
    pub kv_cache_tokens: usize,
    /// Generation: `continuous` (join between steps), `static` (whole-request batches) or
    /// `padded` (whole-request batches computing finished rows, as HF `generate` does).
    pub scheduling: Scheduling,
    /// Longest a shutdown waits for queued and in-flight work. Default 30s.
    #[serde(with = "duration::serde_dur")]
    pub drain_timeout: Duration,
    /// One model replica per entry: `cpu` or `cuda:N`. Default `["cpu"]`. Restart-only.
    pub devices: Vec<String>,
    /// Threads candle's CPU kernels use, shared by all CPU replicas (it sizes one process-wide
    /// pool); 0 = every core. Restart-only.
    pub cpu_threads: usize,
    /// `synthetic:minilm` (built in, no download) or a path to a Hugging Face BERT folder.
    /// Restart-only.
    pub model: String,
    /// Weight and activation precision. Default f32. Restart-only.
    pub dtype: Dtype,
    /// How a tuned profile was measured (written by `tuner`); ignored by the runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<BTreeMap<String, toml::Value>>,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            max_batch_size: 32,
            max_batch_tokens: 16384,
            batch_wait_timeout: Duration::from_millis(5),
            max_concurrent_batches: 2,
            max_queue_size: 1024,
            overflow: Overflow::Reject,
            queue_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            rate_limit: 0.0,
            rate_burst: 0,
            max_inputs_per_request: 256,
            max_input_tokens: 512,
            max_new_tokens: 256,
            kv_cache_tokens: 32768,
            scheduling: Scheduling::Continuous,
            drain_timeout: Duration::from_secs(30),
            devices: vec!["cpu".into()],
            cpu_threads: 0,
            model: DEFAULT_MODEL.into(),
            dtype: Dtype::F32,
            provenance: None,
        }
    }
}

/// The embedded model: BERT with all-MiniLM-L6-v2's shape and deterministic random weights.
pub const DEFAULT_MODEL: &str = "synthetic:minilm";

/// Knobs that need a restart: they decide what is loaded on which device.
pub const RESTART_ONLY: &[&str] = &["devices", "cpu_threads", "model", "dtype"];

/// Every knob name, in schema order (used for env overrides and error messages).
pub const KNOBS: &[&str] = &[
    "max_batch_size",
    "max_batch_tokens",
    "batch_wait_timeout",
    "max_concurrent_batches",
    "max_queue_size",
    "overflow",
    "queue_timeout",
    "request_timeout",
    "rate_limit",
    "rate_burst",
    "max_inputs_per_request",
    "max_input_tokens",
    "max_new_tokens",
    "kv_cache_tokens",
    "scheduling",
    "drain_timeout",
    "devices",
    "cpu_threads",
    "model",
    "dtype",
];

/// The seeds' environment variable names and the knob each one sets. Variables whose value is a
/// bare number of seconds or milliseconds say so in the unit, so `0.05` and `50` mean the same wait.
pub const SEED_ENV: &[(&str, &str, EnvUnit)] = &[
    ("MAX_INFERENCE_BATCH_SIZE", "max_batch_size", EnvUnit::Plain),
    ("BATCH_SIZE", "max_batch_size", EnvUnit::Plain),
    ("BATCH_WAIT_TIMEOUT", "batch_wait_timeout", EnvUnit::Seconds),
    ("BATCH_WAIT_TIME_MS", "batch_wait_timeout", EnvUnit::Millis),
    (
        "MAX_CONCURRENT_GENERATIONS",
        "max_concurrent_batches",
        EnvUnit::Plain,
    ),
    (
        "MAX_CONCURRENT_BATCHES",
        "max_concurrent_batches",
        EnvUnit::Plain,
    ),
    ("MAX_INFERENCE_QUEUE_SIZE", "max_queue_size", EnvUnit::Plain),
    ("MAX_QUEUE_SIZE", "max_queue_size", EnvUnit::Plain),
    ("REQUEST_TIMEOUT", "request_timeout", EnvUnit::Seconds),
    ("QUEUE_TIMEOUT", "queue_timeout", EnvUnit::Seconds),
    ("QUEUE_OVERFLOW_ACTION", "overflow", EnvUnit::Plain),
    ("MAX_NEW_TOKENS", "max_new_tokens", EnvUnit::Plain),
];

/// How a seed variable's bare number is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvUnit {
    /// The value is used as written.
    Plain,
    /// A bare number is seconds (`0.05` = 50ms).
    Seconds,
    /// A bare number is milliseconds.
    Millis,
}

impl Profile {
    /// Generation: sequences the server runs at once over all its replicas (the running cap,
    /// times the groups of static and padded scheduling). A closed loop of this many clients
    /// fills every batch, which is what a saturation estimate needs.
    pub fn running_capacity(&self) -> usize {
        let groups = match self.scheduling {
            Scheduling::Continuous => 1,
            Scheduling::Static | Scheduling::Padded => self.max_concurrent_batches,
        };
        self.max_batch_size * groups * self.devices.len().max(1)
    }

    /// Parses a profile from TOML text; unknown knobs and bad types are errors naming the knob.
    pub fn from_toml_str(text: &str) -> Result<Profile, ProfileError> {
        toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string().trim_end().to_string()))
    }

    /// Reads and parses a profile file (not yet validated: call [`Profile::validate`]).
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
            .map_err(|e| ProfileError::Parse(format!("{}: {e}", path.display())))
    }

    /// Serializes to TOML, durations as strings with units.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a Profile always serializes")
    }

    /// Applies environment overrides: the seeds' names first, then `BATCHTUNE_<KNOB>` so the
    /// project's own names win when both are set. Takes the variables as an iterator so callers
    /// (and tests) decide where they come from.
    pub fn apply_env<I, K, V>(&mut self, vars: I) -> Result<Vec<String>, ProfileError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string()))
            .collect();
        let mut applied = Vec::new();
        for (var, knob, unit) in SEED_ENV {
            if let Some(v) = vars.get(*var) {
                let value = match unit {
                    EnvUnit::Plain => v.clone(),
                    EnvUnit::Seconds => bare_number_with_unit(var, v, "s")?,
                    EnvUnit::Millis => bare_number_with_unit(var, v, "ms")?,
                };
                self.set_knob(knob, &value)
                    .map_err(|e| ProfileError::Parse(format!("{var}={v}: {e}")))?;
                applied.push(format!("{var} -> {knob}"));
            }
        }
        for knob in KNOBS {
            let var = format!("BATCHTUNE_{}", knob.to_uppercase());
            if let Some(v) = vars.get(&var) {
                self.set_knob(knob, v)
                    .map_err(|e| ProfileError::Parse(format!("{var}={v}: {e}")))?;
                applied.push(format!("{var} -> {knob}"));
            }
        }
        // A misspelt override (BATCHTUNE_MAX_BATCHSIZE) would otherwise be silently ignored
        // and the server would run with a knob its operator thinks is set.
        let unknown: Vec<&String> = vars
            .keys()
            .filter(|k| k.starts_with("BATCHTUNE_") && !OTHER_ENV.contains(&k.as_str()))
            .filter(|k| {
                !KNOBS
                    .iter()
                    .any(|knob| **k == format!("BATCHTUNE_{}", knob.to_uppercase()))
            })
            .collect();
        if !unknown.is_empty() {
            return Err(ProfileError::Parse(format!(
                "unknown environment variable{} {}: knob overrides are BATCHTUNE_<KNOB> for knobs {}; other variables are {}",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                KNOBS.join(", "),
                OTHER_ENV.join(", ")
            )));
        }
        Ok(applied)
    }

    /// Sets one knob from its textual form (as on a command line or in an env variable).
    pub fn set_knob(&mut self, knob: &str, value: &str) -> Result<(), ProfileError> {
        let bad = |rule: &str| {
            ProfileError::Invalid(vec![Violation {
                knob: knob.to_string(),
                value: value.to_string(),
                rule: rule.to_string(),
            }])
        };
        let uint = || {
            value
                .trim()
                .parse::<usize>()
                .map_err(|_| bad("must be a whole number ≥ 0"))
        };
        let dur = || parse_duration(value).map_err(|e| bad(&e));
        match knob {
            "max_batch_size" => self.max_batch_size = uint()?,
            "max_batch_tokens" => self.max_batch_tokens = uint()?,
            "batch_wait_timeout" => self.batch_wait_timeout = dur()?,
            "max_concurrent_batches" => self.max_concurrent_batches = uint()?,
            "max_queue_size" => self.max_queue_size = uint()?,
            "overflow" => {
                self.overflow = match value.trim().to_ascii_lowercase().as_str() {
                    "reject" => Overflow::Reject,
                    "wait" => Overflow::Wait,
                    _ => return Err(bad("must be \"reject\" or \"wait\"")),
                }
            }
            "queue_timeout" => self.queue_timeout = dur()?,
            "request_timeout" => self.request_timeout = dur()?,
            "rate_limit" => {
                self.rate_limit = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("must be a number (requests/s)"))?
            }
            "rate_burst" => {
                self.rate_burst = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("must be a whole number ≥ 0"))?
            }
            "max_inputs_per_request" => self.max_inputs_per_request = uint()?,
            "max_input_tokens" => self.max_input_tokens = uint()?,
            "max_new_tokens" => self.max_new_tokens = uint()?,
            "kv_cache_tokens" => self.kv_cache_tokens = uint()?,
            "scheduling" => {
                self.scheduling = match value.trim().to_ascii_lowercase().as_str() {
                    "continuous" => Scheduling::Continuous,
                    "static" => Scheduling::Static,
                    "padded" => Scheduling::Padded,
                    _ => return Err(bad("must be \"continuous\", \"static\" or \"padded\"")),
                }
            }
            "drain_timeout" => self.drain_timeout = dur()?,
            "devices" => {
                self.devices = value
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .trim_matches(|c| c == '"' || c == '[' || c == ']')
                            .to_string()
                    })
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "cpu_threads" => self.cpu_threads = uint()?,
            "model" => self.model = value.trim().to_string(),
            "dtype" => {
                self.dtype = match value.trim().to_ascii_lowercase().as_str() {
                    "f32" => Dtype::F32,
                    "f16" => Dtype::F16,
                    "bf16" => Dtype::Bf16,
                    _ => return Err(bad("must be f32, f16 or bf16")),
                }
            }
            _ => {
                return Err(ProfileError::Parse(format!(
                    "unknown knob `{knob}`; knobs are: {}",
                    KNOBS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Checks every rule and returns all violations at once, so a user fixes a file in one pass.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let mut v = Vec::new();
        let mut check = |ok: bool, knob: &str, value: String, rule: &str| {
            if !ok {
                v.push(Violation {
                    knob: knob.into(),
                    value,
                    rule: rule.into(),
                });
            }
        };
        let d = format_duration;
        check(
            (1..=4096).contains(&self.max_batch_size),
            "max_batch_size",
            self.max_batch_size.to_string(),
            "must be between 1 and 4096",
        );
        check(
            (1..=65_536).contains(&self.max_input_tokens),
            "max_input_tokens",
            self.max_input_tokens.to_string(),
            "must be between 1 and 65536",
        );
        check(
            self.max_batch_tokens >= self.max_input_tokens && self.max_batch_tokens <= 16_777_216,
            "max_batch_tokens",
            self.max_batch_tokens.to_string(),
            &format!(
                "must be at least max_input_tokens ({}) so any valid input fits, and at most 16777216",
                self.max_input_tokens
            ),
        );
        check(
            self.batch_wait_timeout <= Duration::from_secs(10),
            "batch_wait_timeout",
            d(self.batch_wait_timeout),
            "must be at most 10s",
        );
        check(
            (1..=1024).contains(&self.max_concurrent_batches),
            "max_concurrent_batches",
            self.max_concurrent_batches.to_string(),
            "must be between 1 and 1024",
        );
        check(
            (1..=1_000_000).contains(&self.max_queue_size),
            "max_queue_size",
            self.max_queue_size.to_string(),
            "must be between 1 and 1000000",
        );
        check(
            self.queue_timeout <= Duration::from_secs(3600),
            "queue_timeout",
            d(self.queue_timeout),
            "must be at most 1h",
        );
        check(
            self.request_timeout >= Duration::from_millis(1)
                && self.request_timeout <= Duration::from_secs(3600),
            "request_timeout",
            d(self.request_timeout),
            "must be between 1ms and 1h",
        );
        // Below one request per 1000 s the limiter's period overflows what its clock can hold
        // (and no one means it): such a value once passed and made every request panic.
        check(
            self.rate_limit == 0.0 || (MIN_RATE_LIMIT..=1e6).contains(&self.rate_limit),
            "rate_limit",
            self.rate_limit.to_string(),
            "must be 0 (off) or between 0.001 and 1000000 requests/s",
        );
        check(
            (1..=65_536).contains(&self.max_inputs_per_request),
            "max_inputs_per_request",
            self.max_inputs_per_request.to_string(),
            "must be between 1 and 65536",
        );
        check(
            (1..=32_768).contains(&self.max_new_tokens),
            "max_new_tokens",
            self.max_new_tokens.to_string(),
            "must be between 1 and 32768",
        );
        check(
            (16..=16_777_216).contains(&self.kv_cache_tokens),
            "kv_cache_tokens",
            self.kv_cache_tokens.to_string(),
            "must be between 16 and 16777216",
        );
        check(
            self.drain_timeout <= Duration::from_secs(3600),
            "drain_timeout",
            d(self.drain_timeout),
            "must be at most 1h",
        );
        check(
            !self.devices.is_empty() && self.devices.len() <= 64,
            "devices",
            format!("{:?}", self.devices),
            "must list between 1 and 64 devices",
        );
        for dev in &self.devices {
            check(
                parse_device(dev).is_some(),
                "devices",
                format!("{dev:?}"),
                "each device must be \"cpu\" or \"cuda:N\"",
            );
        }
        check(
            self.cpu_threads <= 1024,
            "cpu_threads",
            self.cpu_threads.to_string(),
            "must be at most 1024",
        );
        check(
            !self.model.trim().is_empty(),
            "model",
            format!("{:?}", self.model),
            "must not be empty",
        );
        if v.is_empty() {
            Ok(())
        } else {
            Err(ProfileError::Invalid(v))
        }
    }

    /// Applies a partial update (a JSON object of knob → value) as a hot reload would: the result
    /// is validated, and a change to a restart-only knob is refused, naming the knobs.
    pub fn patched(&self, patch: &serde_json::Value) -> Result<Profile, ProfileError> {
        let obj = patch.as_object().ok_or_else(|| {
            ProfileError::Parse("the body must be a JSON object of knob: value".into())
        })?;
        let current = serde_json::to_value(self).expect("a Profile always serializes");
        let mut merged = current.clone();
        let target = merged.as_object_mut().expect("a Profile is an object");
        for (k, val) in obj {
            if !KNOBS.contains(&k.as_str()) && k != "provenance" {
                return Err(ProfileError::Parse(format!(
                    "unknown knob `{k}`; knobs are: {}",
                    KNOBS.join(", ")
                )));
            }
            target.insert(k.clone(), val.clone());
        }
        // A wrong type (`-1`, `1.5`, `"16"`, `null` for a count) names its knob: each patched
        // knob is tried alone on the current profile, so every bad one is listed.
        let wrong: Vec<Violation> = obj
            .iter()
            .filter(|(k, _)| k.as_str() != "provenance")
            .filter_map(|(k, val)| {
                let mut probe = current.clone();
                probe
                    .as_object_mut()
                    .expect("a Profile is an object")
                    .insert(k.clone(), val.clone());
                serde_json::from_value::<Profile>(probe)
                    .err()
                    .map(|e| Violation {
                        knob: k.clone(),
                        value: val.to_string(),
                        rule: format!("wrong type or format ({e})"),
                    })
            })
            .collect();
        if !wrong.is_empty() {
            return Err(ProfileError::Invalid(wrong));
        }
        let next: Profile =
            serde_json::from_value(merged).map_err(|e| ProfileError::Parse(e.to_string()))?;
        next.validate()?;
        let changed: Vec<String> = RESTART_ONLY
            .iter()
            .filter(|k| {
                let a = serde_json::to_value(self)
                    .ok()
                    .and_then(|v| v.get(**k).cloned());
                let b = serde_json::to_value(&next)
                    .ok()
                    .and_then(|v| v.get(**k).cloned());
                a != b
            })
            .map(|k| k.to_string())
            .collect();
        if !changed.is_empty() {
            return Err(ProfileError::RestartRequired(changed));
        }
        Ok(next)
    }

    /// The burst the rate limiter allows: `rate_burst`, or `ceil(rate_limit)` when that is 0.
    pub fn effective_burst(&self) -> u32 {
        if self.rate_burst > 0 {
            self.rate_burst
        } else {
            (self.rate_limit.ceil() as u32).max(1)
        }
    }
}

/// A device entry: `cpu` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

/// Parses `cpu` / `cuda:N`; `None` for anything else.
pub fn parse_device(s: &str) -> Option<DeviceSpec> {
    let s = s.trim();
    if s == "cpu" {
        return Some(DeviceSpec::Cpu);
    }
    s.strip_prefix("cuda:")
        .and_then(|n| n.parse().ok())
        .map(DeviceSpec::Cuda)
}

fn bare_number_with_unit(var: &str, v: &str, unit: &str) -> Result<String, ProfileError> {
    let t = v.trim();
    if t.parse::<f64>().is_ok() {
        Ok(format!("{t}{unit}"))
    } else if parse_duration(t).is_ok() {
        Ok(t.to_string())
    } else {
        Err(ProfileError::Parse(format!(
            "{var}={v}: expected a number of {unit} or a duration like 50ms"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip() {
        let p = Profile::default();
        p.validate().unwrap();
        let text = p.to_toml_string();
        assert!(text.contains("batch_wait_timeout = \"5ms\""), "{text}");
        assert_eq!(Profile::from_toml_str(&text).unwrap(), p);
    }

    #[test]
    fn a_misspelt_override_is_an_error_naming_it() {
        let mut p = Profile::default();
        let e = p
            .apply_env([("BATCHTUNE_MAX_BATCHSIZE", "8"), ("BATCHTUNE_ADDR", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BATCHTUNE_MAX_BATCHSIZE") && !e.contains("variables BATCHTUNE_ADDR"),
            "{e}"
        );
        p.apply_env([
            ("BATCHTUNE_MAX_BATCH_SIZE", "8"),
            ("BATCHTUNE_RUNTIME", "x"),
            ("OTHER", "y"),
        ])
        .unwrap();
        assert_eq!(p.max_batch_size, 8);
    }

    #[test]
    fn a_tiny_or_odd_rate_limit_is_refused_not_accepted() {
        for bad in [5e-11, 1e-4, -1.0, f64::NAN, f64::INFINITY, 2e6] {
            let p = Profile {
                rate_limit: bad,
                ..Profile::default()
            };
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains("rate_limit"), "{bad}: {msg}");
        }
        for ok in [0.0, 0.001, 1.0, 1e6] {
            let p = Profile {
                rate_limit: ok,
                ..Profile::default()
            };
            p.validate().unwrap();
        }
    }

    #[test]
    fn a_patch_of_the_wrong_type_names_its_knob() {
        let p = Profile::default();
        for (patch, knob) in [
            (serde_json::json!({"max_batch_size": -1}), "max_batch_size"),
            (serde_json::json!({"max_batch_size": 1.5}), "max_batch_size"),
            (
                serde_json::json!({"max_queue_size": "16"}),
                "max_queue_size",
            ),
            (serde_json::json!({"rate_limit": null}), "rate_limit"),
            (
                serde_json::json!({"batch_wait_timeout": 5}),
                "batch_wait_timeout",
            ),
        ] {
            match p.patched(&patch) {
                Err(ProfileError::Invalid(v)) => {
                    assert_eq!(v.len(), 1, "{v:?}");
                    assert_eq!(v[0].knob, knob);
                }
                other => panic!("{patch}: {other:?}"),
            }
        }
        // Two bad knobs: both named.
        let e = p
            .patched(&serde_json::json!({"max_batch_size": "x", "rate_limit": "y"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_batch_size") && e.contains("rate_limit"),
            "{e}"
        );
    }

    #[test]
    fn violations_name_knob_value_and_rule() {
        let p = Profile {
            max_batch_size: 0,
            max_batch_tokens: 10,
            ..Profile::default()
        };
        let msg = p.validate().unwrap_err().to_string();
        assert!(
            msg.contains("max_batch_size = 0: must be between 1 and 4096"),
            "{msg}"
        );
        assert!(
            msg.contains("max_batch_tokens = 10: must be at least max_input_tokens (512)"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_knob_and_unitless_duration_are_parse_errors() {
        let e = Profile::from_toml_str("max_batch = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_batch"), "{e}");
        let e = Profile::from_toml_str("batch_wait_timeout = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unit"), "{e}");
        let e = Profile::from_toml_str("batch_wait_timeout = \"5 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_wait_timeout"), "{e}");
    }

    #[test]
    fn seed_env_names_with_their_units() {
        let mut p = Profile::default();
        p.apply_env([
            ("BATCH_WAIT_TIMEOUT", "0.05"),
            ("MAX_INFERENCE_BATCH_SIZE", "4"),
            ("MAX_CONCURRENT_GENERATIONS", "6"),
            ("MAX_INFERENCE_QUEUE_SIZE", "500"),
            ("QUEUE_OVERFLOW_ACTION", "wait"),
            ("REQUEST_TIMEOUT", "180"),
        ])
        .unwrap();
        assert_eq!(p.batch_wait_timeout, Duration::from_millis(50));
        assert_eq!(p.max_batch_size, 4);
        assert_eq!(p.max_concurrent_batches, 6);
        assert_eq!(p.max_queue_size, 500);
        assert_eq!(p.overflow, Overflow::Wait);
        assert_eq!(p.request_timeout, Duration::from_secs(180));
        let mut q = Profile::default();
        q.apply_env([
            ("BATCH_WAIT_TIME_MS", "50"),
            ("BATCHTUNE_MAX_BATCH_SIZE", "9"),
            ("BATCH_SIZE", "8"),
        ])
        .unwrap();
        assert_eq!(q.batch_wait_timeout, Duration::from_millis(50));
        assert_eq!(q.max_batch_size, 9, "BATCHTUNE_* wins over the seed name");
        let e = q
            .apply_env([("BATCH_SIZE", "many")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("BATCH_SIZE=many") && e.contains("max_batch_size"),
            "{e}"
        );
    }

    #[test]
    fn patch_changes_live_knobs_and_refuses_restart_only() {
        let p = Profile::default();
        let q = p
            .patched(&serde_json::json!({"max_batch_size": 7, "batch_wait_timeout": "2ms"}))
            .unwrap();
        assert_eq!(q.max_batch_size, 7);
        assert_eq!(q.batch_wait_timeout, Duration::from_millis(2));
        let e = p
            .patched(&serde_json::json!({"devices": ["cpu", "cpu"], "model": "x"}))
            .unwrap_err();
        assert!(
            matches!(e, ProfileError::RestartRequired(ref k) if k == &["devices", "model"]),
            "{e}"
        );
        let e = p
            .patched(&serde_json::json!({"max_batch_size": 0}))
            .unwrap_err();
        assert!(e.to_string().contains("max_batch_size = 0"));
        let e = p.patched(&serde_json::json!({"nope": 1})).unwrap_err();
        assert!(e.to_string().contains("unknown knob `nope`"));
    }

    #[test]
    fn devices_are_checked() {
        let p = Profile {
            devices: vec!["cpu".into(), "gpu0".into()],
            ..Profile::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("\"gpu0\""));
        assert_eq!(parse_device("cuda:1"), Some(DeviceSpec::Cuda(1)));
    }

    #[test]
    fn shipped_profiles_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml")
                && path.file_name().unwrap() != "Cargo.toml"
            {
                Profile::load(&path)
                    .unwrap()
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 9, "expected the shipped profiles, found {n}");
    }
}
