//! Adapter files: how to start, reach, load and configure an HTTP inference server that is not
//! batchtune's runtime (a FastAPI app configured by `.env`, vLLM, TGI, TEI), in TOML:
//!
//! ```toml
//! name = "my FastAPI app"
//! [start]
//! command = ["uvicorn", "app:app", "--port", "{port}"]  # {port} is required; {KNOB} also works
//! workdir = "../llm_model"          # relative to the adapter file
//! env = { LOG_LEVEL = "warning" }   # fixed, not searched
//! [ready]
//! health = "/health"                # or log_line = "Application startup complete"
//! timeout = "120s"
//! [workload]
//! kind = "completions"              # embeddings | completions | chat | tei-embed | template
//! max_tokens = 64
//! [knobs.BATCH_WAIT_TIMEOUT]
//! env = "BATCH_WAIT_TIMEOUT"        # or flag = "--batch-wait", or client = "concurrency"
//! type = "duration"                 # int | float | duration | choice
//! min = "1ms"
//! max = "200ms"
//! unit = "s"                        # the server reads seconds: 80ms is written 0.08
//! default = "80ms"
//! ```
//!
//! Every field is checked when the file is loaded, naming the knob and the field at fault.

use crate::space::{Domain, Knobs, Scale, Space, Value};
use loadgen::workload::{Lengths, TextOptions, Workload};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An adapter file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("adapter {path}: {why}")]
pub struct AdapterError {
    /// The file.
    pub path: String,
    /// What is wrong, naming the field.
    pub why: String,
}

/// A parsed, checked adapter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adapter {
    /// Name for messages and provenance.
    pub name: String,
    /// Free text for readers (what the server is, what cannot be run here).
    #[serde(default)]
    pub notes: Option<String>,
    /// How to start it.
    pub start: Start,
    /// When it is ready.
    pub ready: Ready,
    /// What to send it.
    pub workload: WorkloadSpec,
    /// Knob name → how it is passed and searched.
    pub knobs: BTreeMap<String, KnobSpec>,
    /// Extra lines of the tuned client file.
    #[serde(default)]
    pub output: Output,
    /// The folder holding the file (relative paths resolve against it).
    #[serde(skip)]
    pub dir: PathBuf,
}

/// The `[start]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// Program and arguments; `{port}` and `{KNOB}` placeholders are filled per trial.
    pub command: Vec<String>,
    /// Working directory, relative to the adapter file.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Fixed environment variables (values may hold `{port}`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How long SIGTERM gets before SIGKILL.
    #[serde(default = "default_stop")]
    pub stop_timeout: String,
}

fn default_stop() -> String {
    "10s".into()
}

/// The `[ready]` table: a health path answering 200, or a line in the server's output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// GET path that answers 200 once the model is loaded.
    #[serde(default)]
    pub health: Option<String>,
    /// Text of a log line printed once ready (stdout or stderr).
    #[serde(default)]
    pub log_line: Option<String>,
    /// Longest wait for readiness.
    #[serde(default = "default_ready")]
    pub timeout: String,
    /// Pause after each probe so a server that cannot report its queue drains it.
    #[serde(default = "default_settle")]
    pub settle: String,
}

fn default_ready() -> String {
    "120s".into()
}

fn default_settle() -> String {
    "1s".into()
}

/// What the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// OpenAI `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/chat/completions`.
    Chat,
    /// TEI `POST /embed` (`{"inputs": …}`).
    TeiEmbed,
    /// A raw body `template` with a `{{text}}` placeholder, POSTed to `path`.
    Template,
}

/// The `[workload]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Request shape.
    pub kind: WorkloadKind,
    /// Request path (defaults to the kind's).
    #[serde(default)]
    pub path: Option<String>,
    /// Body template (kind = "template").
    #[serde(default)]
    pub template: Option<String>,
    /// `model` field put in every JSON body (vLLM needs the served name).
    #[serde(default)]
    pub model: Option<String>,
    /// Output tokens per generation request.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Stream generation responses (SSE): needed for time to first token.
    #[serde(default)]
    pub stream: bool,
}

/// How a knob's duration is written for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Unit {
    /// Seconds as a decimal number (`0.08`).
    #[serde(rename = "s")]
    Seconds,
    /// Milliseconds (`80`).
    #[serde(rename = "ms")]
    Millis,
    /// Microseconds (`80000`).
    #[serde(rename = "us")]
    Micros,
}

/// What a client knob sets on the load generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientRole {
    /// The cap on requests in flight (a pipeline's concurrent requests).
    Concurrency,
}

/// One `[knobs.NAME]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnobSpec {
    /// Environment variable that carries it.
    #[serde(default)]
    pub env: Option<String>,
    /// Command-line flag that carries it (`--flag VALUE` appended to the command).
    #[serde(default)]
    pub flag: Option<String>,
    /// A client-side knob instead of a server one.
    #[serde(default)]
    pub client: Option<ClientRole>,
    /// `int`, `float`, `duration` or `choice`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Smallest value (number, or a duration such as `"1ms"`).
    #[serde(default)]
    pub min: Option<toml::Value>,
    /// Largest value.
    #[serde(default)]
    pub max: Option<toml::Value>,
    /// `log` (default) or `linear`.
    #[serde(default)]
    pub scale: Scale,
    /// The options of a `choice` knob.
    #[serde(default)]
    pub choices: Vec<String>,
    /// How a duration is written for the server (default: with its unit, `80ms`).
    #[serde(default)]
    pub unit: Option<Unit>,
    /// The server's own default (the search starts there; the baseline of comparisons).
    #[serde(default)]
    pub default: Option<toml::Value>,
}

/// The `[output]` table: pipeline settings derived from the tuned sustainable rate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// Variable written with the client's rate in requests per minute (seed 001's
    /// `REQUESTS_PER_MINUTE`).
    #[serde(default)]
    pub rate_per_minute: Option<String>,
    /// Variable written with the client's rate in requests per second.
    #[serde(default)]
    pub rate_per_second: Option<String>,
}

impl Adapter {
    /// Reads and checks an adapter file.
    pub fn load(path: &Path) -> Result<Adapter, AdapterError> {
        let err = |why: String| AdapterError {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut a: Adapter = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        a.dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        a.check().map_err(err)?;
        Ok(a)
    }

    fn check(&self) -> Result<(), String> {
        if self.start.command.is_empty() {
            return Err("start.command is empty".into());
        }
        let holds = |p: &str| {
            self.start.command.iter().any(|a| a.contains(p))
                || self.start.env.values().any(|v| v.contains(p))
        };
        if !holds("{port}") {
            return Err(
                "start.command (or start.env) must take the port the tuner picks: put {port} where it goes"
                    .into(),
            );
        }
        for (what, d) in [
            ("start.stop_timeout", &self.start.stop_timeout),
            ("ready.timeout", &self.ready.timeout),
            ("ready.settle", &self.ready.settle),
        ] {
            profiles::parse_duration(d).map_err(|e| format!("{what}: {e}"))?;
        }
        match (&self.ready.health, &self.ready.log_line) {
            (None, None) => return Err("ready needs `health` (a path) or `log_line`".into()),
            (Some(h), _) if !h.starts_with('/') => {
                return Err(format!("ready.health {h:?} must be a path starting with /"))
            }
            _ => {}
        }
        let w = &self.workload;
        match (w.kind, &w.template) {
            (WorkloadKind::Template, None) => {
                return Err("workload.kind = \"template\" needs workload.template".into())
            }
            (WorkloadKind::Template, Some(t)) if !t.contains("{{text}}") => {
                return Err("workload.template has no {{text}} placeholder".into())
            }
            (k, Some(_)) if k != WorkloadKind::Template => {
                return Err("workload.template is only for kind = \"template\"".into())
            }
            _ => {}
        }
        if w.max_tokens == Some(0) {
            return Err("workload.max_tokens must be at least 1".into());
        }
        if self.knobs.is_empty() {
            return Err("no [knobs.NAME] table: nothing to tune".into());
        }
        for (name, k) in &self.knobs {
            let at = |why: String| format!("knobs.{name}: {why}");
            let placeholder = holds(&format!("{{{name}}}"));
            let ways = [k.env.is_some(), k.flag.is_some(), k.client.is_some()]
                .iter()
                .filter(|b| **b)
                .count();
            if ways > 1 || (ways == 0 && !placeholder) {
                return Err(at(format!(
                    "give exactly one of env, flag or client (or put {{{name}}} in start.command)"
                )));
            }
            let d = Self::domain(k).map_err(at)?;
            if k.client.is_some() && k.kind != "int" {
                return Err(at("a client concurrency knob has type = \"int\"".into()));
            }
            if k.unit.is_some() && k.kind != "duration" {
                return Err(at("unit is only for type = \"duration\"".into()));
            }
            let one = Space {
                knobs: [(name.clone(), d.clone())].into(),
            };
            one.check_shape().map_err(|e| at(e.0))?;
            if let Some(v) = &k.default {
                let v = parse_value(&d, v).map_err(|e| at(format!("default: {e}")))?;
                if !within(&d, &v) {
                    return Err(at(format!("default {v} is outside [min, max]")));
                }
            }
        }
        if let Some(v) = [&self.output.rate_per_minute, &self.output.rate_per_second]
            .into_iter()
            .flatten()
            .find(|v| !is_var(v))
        {
            return Err(format!("output: {v:?} is not a variable name"));
        }
        Ok(())
    }

    /// A knob's search domain.
    fn domain(k: &KnobSpec) -> Result<Domain, String> {
        let num = |v: &Option<toml::Value>, f: &str| -> Result<f64, String> {
            match v {
                Some(toml::Value::Integer(i)) => Ok(*i as f64),
                Some(toml::Value::Float(x)) => Ok(*x),
                Some(other) => Err(format!("{f} = {other} is not a number")),
                None => Err(format!("{f} is missing")),
            }
        };
        let dur = |v: &Option<toml::Value>, f: &str| -> Result<String, String> {
            match v {
                Some(toml::Value::String(s)) => profiles::parse_duration(s)
                    .map(|_| s.clone())
                    .map_err(|e| format!("{f}: {e}")),
                Some(other) => Err(format!("{f} = {other}: write a duration such as \"50ms\"")),
                None => Err(format!("{f} is missing")),
            }
        };
        Ok(match k.kind.as_str() {
            "int" => {
                let (lo, hi) = (num(&k.min, "min")?, num(&k.max, "max")?);
                if lo.fract() != 0.0 || hi.fract() != 0.0 {
                    return Err("an int knob needs whole min and max".into());
                }
                Domain::Int {
                    min: lo as i64,
                    max: hi as i64,
                    scale: k.scale,
                }
            }
            "float" => Domain::Float {
                min: num(&k.min, "min")?,
                max: num(&k.max, "max")?,
                scale: k.scale,
            },
            "duration" => Domain::Duration {
                min: dur(&k.min, "min")?,
                max: dur(&k.max, "max")?,
                scale: k.scale,
            },
            "choice" => {
                if k.choices.is_empty() {
                    return Err("a choice knob needs choices = [...]".into());
                }
                Domain::Choice {
                    choices: k.choices.clone(),
                }
            }
            other => {
                return Err(format!(
                    "type = {other:?}: use int, float, duration or choice"
                ))
            }
        })
    }

    /// The search space: every knob's domain.
    pub fn space(&self) -> Space {
        Space {
            knobs: self
                .knobs
                .iter()
                .map(|(n, k)| (n.clone(), Self::domain(k).expect("checked at load")))
                .collect(),
        }
    }

    /// The knobs' defaults (where local searches start); knobs without one are left out.
    pub fn defaults(&self) -> Knobs {
        self.knobs
            .iter()
            .filter_map(|(n, k)| {
                let d = Self::domain(k).ok()?;
                Some((n.clone(), parse_value(&d, k.default.as_ref()?).ok()?))
            })
            .collect()
    }

    /// Whether `knob` is set on the client, not the server.
    pub fn is_client(&self, knob: &str) -> bool {
        self.knobs.get(knob).is_some_and(|k| k.client.is_some())
    }

    /// Whether `knob` caps the client's requests in flight.
    pub fn is_client_concurrency(&self, knob: &str) -> bool {
        self.knobs
            .get(knob)
            .is_some_and(|k| k.client == Some(ClientRole::Concurrency))
    }

    /// A value as the server reads it (durations converted to the knob's unit).
    pub fn text_of(&self, knob: &str, v: &Value) -> String {
        let unit = self.knobs.get(knob).and_then(|k| k.unit);
        match (v, unit) {
            (Value::Text(s), Some(u)) => {
                let secs = profiles::parse_duration(s)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                let x = match u {
                    Unit::Seconds => secs,
                    Unit::Millis => secs * 1e3,
                    Unit::Micros => secs * 1e6,
                };
                // Shortest decimal that round-trips to the microsecond.
                let s = format!("{:.6}", x);
                let s = s.trim_end_matches('0').trim_end_matches('.');
                if s.is_empty() { "0" } else { s }.to_string()
            }
            (Value::Float(x), _) => format!("{}", (x * 1e4).round() / 1e4),
            _ => v.to_string(),
        }
    }

    /// The command line and environment of a server with `knobs` (server knobs only) on
    /// `port`.
    pub fn render(&self, knobs: &Knobs, port: u16) -> (Vec<String>, Vec<(String, String)>) {
        let fill = |s: &str| -> String {
            let mut s = s.replace("{port}", &port.to_string());
            for (k, v) in knobs {
                s = s.replace(&format!("{{{k}}}"), &self.text_of(k, v));
            }
            s
        };
        let mut argv: Vec<String> = self.start.command.iter().map(|a| fill(a)).collect();
        let mut env: Vec<(String, String)> = self
            .start
            .env
            .iter()
            .map(|(k, v)| (k.clone(), fill(v)))
            .collect();
        for (k, v) in knobs {
            let Some(spec) = self.knobs.get(k) else {
                continue;
            };
            if let Some(var) = &spec.env {
                env.push((var.clone(), self.text_of(k, v)));
            }
            if let Some(flag) = &spec.flag {
                argv.push(flag.clone());
                argv.push(self.text_of(k, v));
            }
        }
        (argv, env)
    }

    /// The working directory, resolved against the adapter's folder.
    pub fn workdir(&self) -> PathBuf {
        match &self.start.workdir {
            Some(w) if w.is_absolute() => w.clone(),
            Some(w) => self.dir.join(w),
            None => self.dir.clone(),
        }
    }

    /// A duration field (checked at load).
    pub fn duration(s: &str) -> Duration {
        profiles::parse_duration(s).unwrap_or(Duration::from_secs(1))
    }

    /// The request bodies and path, built from `o` (lengths, seed) and the workload table.
    pub fn workload(&self, o: &TextOptions) -> Result<Workload, String> {
        let w = &self.workload;
        let mut o = o.clone();
        o.stream = w.stream;
        if let Some(n) = w.max_tokens {
            o.output_tokens = Lengths::Fixed(n);
        }
        let mut wl = match w.kind {
            WorkloadKind::Embeddings => Workload::from_spec("embeddings", &o)?,
            WorkloadKind::Completions => Workload::from_spec("completions", &o)?,
            WorkloadKind::Chat => Workload::from_spec("chat", &o)?,
            WorkloadKind::TeiEmbed => {
                Workload::from_template(r#"{"inputs": "{{text}}"}"#, "/embed", &o)?
            }
            WorkloadKind::Template => Workload::from_template(
                w.template.as_deref().unwrap_or_default(),
                w.path.as_deref().unwrap_or("/"),
                &o,
            )?,
        };
        if let Some(p) = &w.path {
            wl.path = p.clone();
        }
        if let Some(m) = &w.model {
            for b in &mut wl.bodies {
                if let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice(b) {
                    obj.insert("model".into(), m.clone().into());
                    *b = serde_json::Value::Object(obj).to_string().into();
                }
            }
        }
        wl.name = format!("{} ({:?})", self.name, w.kind).to_lowercase();
        Ok(wl)
    }

    /// The tuned server settings as a `.env` file (environment knobs) and a flags line (flag
    /// knobs, `None` when there are none).
    pub fn server_files(&self, knobs: &Knobs, header: &str) -> (String, Option<String>) {
        let mut env = format!("{header}\n");
        let mut flags = Vec::new();
        for (k, v) in knobs {
            let Some(spec) = self.knobs.get(k) else {
                continue;
            };
            if let Some(var) = &spec.env {
                env.push_str(&format!("{var}={}\n", self.text_of(k, v)));
            }
            if let Some(f) = &spec.flag {
                flags.push(format!("{f} {}", self.text_of(k, v)));
            }
            if spec.env.is_none() && spec.flag.is_none() && spec.client.is_none() {
                env.push_str(&format!(
                    "# {{{k}}} in start.command: {}\n",
                    self.text_of(k, v)
                ));
            }
        }
        (env, (!flags.is_empty()).then(|| flags.join(" ")))
    }

    /// The tuned client settings (client knobs and the `[output]` rate lines), or `None` when
    /// the adapter has neither.
    pub fn client_file(&self, knobs: &Knobs, rate_rps: f64, header: &str) -> Option<String> {
        let mut lines = Vec::new();
        for (k, v) in knobs {
            if self.is_client(k) {
                lines.push(format!("{k}={}", self.text_of(k, v)));
            }
        }
        if let Some(var) = &self.output.rate_per_minute {
            lines.push(format!("{var}={}", (rate_rps * 60.0).floor()));
        }
        if let Some(var) = &self.output.rate_per_second {
            lines.push(format!("{var}={:.2}", rate_rps));
        }
        (!lines.is_empty()).then(|| format!("{header}\n{}\n", lines.join("\n")))
    }
}

fn is_var(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// A TOML value as a knob value of domain `d`.
fn parse_value(d: &Domain, v: &toml::Value) -> Result<Value, String> {
    match (d, v) {
        (Domain::Int { .. }, toml::Value::Integer(i)) => Ok(Value::Int(*i)),
        (Domain::Float { .. }, toml::Value::Float(x)) => Ok(Value::Float(*x)),
        (Domain::Float { .. }, toml::Value::Integer(i)) => Ok(Value::Float(*i as f64)),
        (Domain::Duration { .. }, toml::Value::String(s)) => profiles::parse_duration(s)
            .map(|_| Value::Text(s.clone()))
            .map_err(|e| e.to_string()),
        (Domain::Choice { choices }, toml::Value::String(s)) if choices.contains(s) => {
            Ok(Value::Text(s.clone()))
        }
        (_, other) => Err(format!("{other} does not fit the knob's type")),
    }
}

fn within(d: &Domain, v: &Value) -> bool {
    let secs = |s: &str| {
        profiles::parse_duration(s)
            .map(|d| d.as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    match (d, v) {
        (Domain::Int { min, max, .. }, Value::Int(i)) => (min..=max).contains(&i),
        (Domain::Float { min, max, .. }, Value::Float(x)) => *min <= *x && *x <= *max,
        (Domain::Duration { min, max, .. }, Value::Text(s)) => {
            secs(min) <= secs(s) && secs(s) <= secs(max)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Adapter, AdapterError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.toml");
        std::fs::write(&p, text).unwrap();
        Adapter::load(&p)
    }

    const GOOD: &str = r#"
name = "app"
[start]
command = ["python3", "server.py", "--port", "{port}", "--workers", "{WORKERS}"]
[ready]
health = "/health"
[workload]
kind = "completions"
max_tokens = 16
[knobs.BATCH_WAIT_TIMEOUT]
env = "BATCH_WAIT_TIMEOUT"
type = "duration"
min = "1ms"
max = "200ms"
unit = "s"
default = "80ms"
[knobs.max_num_seqs]
flag = "--max-num-seqs"
type = "int"
min = 1
max = 256
default = 64
[knobs.WORKERS]
type = "int"
min = 1
max = 4
scale = "linear"
[knobs.MAX_CONCURRENT_REQUESTS]
client = "concurrency"
type = "int"
min = 1
max = 64
[output]
rate_per_minute = "REQUESTS_PER_MINUTE"
"#;

    #[test]
    fn knobs_render_as_variables_flags_and_placeholders_in_their_units() {
        let a = parse(GOOD).unwrap();
        let mut k = a.defaults();
        assert_eq!(k.len(), 2, "{k:?}");
        k.insert("WORKERS".into(), Value::Int(3));
        let (argv, env) = a.render(&k, 8123);
        assert_eq!(
            argv,
            [
                "python3",
                "server.py",
                "--port",
                "8123",
                "--workers",
                "3",
                "--max-num-seqs",
                "64"
            ]
        );
        assert_eq!(env, [("BATCH_WAIT_TIMEOUT".into(), "0.08".into())]);
        assert!(a.is_client_concurrency("MAX_CONCURRENT_REQUESTS"));
        assert!(!a.is_client("WORKERS"));
        let mut ms = a.clone();
        ms.knobs.get_mut("BATCH_WAIT_TIMEOUT").unwrap().unit = Some(Unit::Millis);
        assert_eq!(
            ms.text_of("BATCH_WAIT_TIMEOUT", &Value::Text("1.5ms".into())),
            "1.5"
        );
        k.insert("MAX_CONCURRENT_REQUESTS".into(), Value::Int(12));
        let client = a.client_file(&k, 4.25, "# tuned").unwrap();
        assert!(client.contains("MAX_CONCURRENT_REQUESTS=12"), "{client}");
        assert!(client.contains("REQUESTS_PER_MINUTE=255"), "{client}");
        let (env, flags) = a.server_files(&k, "# tuned");
        assert!(env.contains("BATCH_WAIT_TIMEOUT=0.08"), "{env}");
        assert_eq!(flags.as_deref(), Some("--max-num-seqs 64"));
    }

    #[test]
    fn bad_files_name_the_field() {
        for (from, to, why) in [
            ("\"{port}\"", "\"8000\"", "{port}"),
            ("health = \"/health\"", "", "ready needs"),
            (
                "type = \"duration\"",
                "type = \"time\"",
                "knobs.BATCH_WAIT_TIMEOUT: type",
            ),
            ("default = \"80ms\"", "default = \"2s\"", "outside"),
            ("min = \"1ms\"", "min = 1", "write a duration"),
            (
                "client = \"concurrency\"",
                "",
                "knobs.MAX_CONCURRENT_REQUESTS: give exactly one",
            ),
            (
                "kind = \"completions\"",
                "kind = \"completion\"",
                "unknown variant",
            ),
            (
                "flag = \"--max-num-seqs\"",
                "flag = \"--x\"\nenv = \"X\"",
                "exactly one",
            ),
            (
                "rate_per_minute",
                "step = 2\nrate_per_minute",
                "unknown field",
            ),
            (
                "min = 1\nmax = 4\nscale = \"linear\"",
                "min = 0\nmax = 4",
                "log scale",
            ),
        ] {
            assert!(GOOD.contains(from), "{from}");
            let e = parse(&GOOD.replacen(from, to, 1)).unwrap_err().to_string();
            assert!(e.contains(why), "{from} → {to}: {e}");
        }
    }
}
