//! Request bodies: built-in embeddings/completions/chat texts, a JSONL file of bodies, or a raw
//! template. Bodies are built before the run so that no JSON is formatted on the send path.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use std::path::Path;

/// What to send and where.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Name for reports (`embeddings`, a file path…).
    pub name: String,
    /// Request path on the server.
    pub path: String,
    /// Pre-built bodies, sent round-robin.
    pub bodies: Vec<Bytes>,
    /// Read the response as a stream and record time to first token and gaps between tokens.
    pub stream: bool,
}

/// Options for the built-in workloads.
#[derive(Debug, Clone)]
pub struct TextOptions {
    /// Median words per text (the length distribution is log-normal around it).
    pub median_words: f64,
    /// Spread of the log-normal (σ of ln words).
    pub sigma: f64,
    /// Inputs per embeddings request.
    pub inputs_per_request: usize,
    /// `max_tokens` for completions/chat, drawn per request.
    pub output_tokens: Lengths,
    /// Ask the server to ignore EOS (vLLM's `ignore_eos`, batchtune's too) so that each
    /// request generates exactly its `max_tokens`: output lengths are then the workload's, not
    /// the model's.
    pub ignore_eos: bool,
    /// Stream the response (SSE): needed for time to first token and inter-token latency.
    pub stream: bool,
    /// Generation: the `temperature` every request sends (`None` sends none, so the server's
    /// default applies: 1 under OpenAI's API). Pinning it makes runs against different servers
    /// sample the same way (0 is greedy).
    pub temperature: Option<f64>,
    /// Seed of the text generator.
    pub seed: u64,
}

/// A length distribution: `fixed:N`, `uniform:A:B` (inclusive), `lognormal:MEDIAN:SIGMA[:MAX]`
/// (clamped to 1..=MAX, MAX 32768 when not given: a server refuses `max_tokens` over its own
/// limit, so a long-tailed workload names the limit it is drawn under).
#[derive(Debug, Clone, PartialEq)]
pub enum Lengths {
    /// Always N.
    Fixed(usize),
    /// Uniform over A..=B.
    Uniform(usize, usize),
    /// Log-normal around a median with σ of ln(length), clamped to at most the third value.
    LogNormal(f64, f64, usize),
}

impl Lengths {
    /// Parses `64`, `fixed:64`, `uniform:16:256`, `lognormal:128:0.5`, `lognormal:32:1:128`.
    pub fn parse(s: &str) -> Result<Lengths, String> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let int = |t: &str| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| (1..=32_768).contains(&n))
                .ok_or_else(|| format!("`{t}` in `{s}` is not a length between 1 and 32768"))
        };
        match parts.as_slice() {
            [n] | ["fixed", n] => Ok(Lengths::Fixed(int(n)?)),
            ["uniform", a, b] => {
                let (a, b) = (int(a)?, int(b)?);
                if a > b {
                    return Err(format!("`{s}`: the lower bound is above the upper"));
                }
                Ok(Lengths::Uniform(a, b))
            }
            ["lognormal", m, sd, max @ ..] if max.len() <= 1 => {
                let m: f64 = m.trim().parse().map_err(|_| format!("`{m}` in `{s}` is not a number"))?;
                let sd: f64 = sd.trim().parse().map_err(|_| format!("`{sd}` in `{s}` is not a number"))?;
                if !(m >= 1.0 && sd >= 0.0 && sd.is_finite()) {
                    return Err(format!("`{s}`: the median must be ≥ 1 and σ ≥ 0"));
                }
                let max = max.first().map_or(Ok(32_768), |t| int(t))?;
                Ok(Lengths::LogNormal(m, sd, max))
            }
            _ => Err(format!(
                "`{s}` is not a length distribution; write N, fixed:N, uniform:A:B or lognormal:MEDIAN:SIGMA[:MAX]"
            )),
        }
    }

    /// One draw.
    pub fn sample(&self, rng: &mut StdRng) -> usize {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform(a, b) => rng.random_range(a..=b),
            Lengths::LogNormal(m, sd, max) => {
                let d = LogNormal::new(m.ln(), sd).expect("validated parameters");
                (d.sample(rng).round() as usize).clamp(1, max)
            }
        }
    }
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            median_words: 24.0,
            sigma: 0.6,
            inputs_per_request: 1,
            output_tokens: Lengths::Fixed(64),
            ignore_eos: false,
            stream: true,
            temperature: None,
            seed: 7,
        }
    }
}

// A small built-in corpus: common English words, so tokenizers see realistic word pieces.
const WORDS: &[&str] = &[
    "the",
    "model",
    "serves",
    "requests",
    "with",
    "dynamic",
    "batching",
    "and",
    "a",
    "queue",
    "of",
    "inputs",
    "latency",
    "throughput",
    "under",
    "load",
    "image",
    "describes",
    "city",
    "street",
    "at",
    "night",
    "people",
    "walking",
    "near",
    "shops",
    "bright",
    "lights",
    "rain",
    "reflections",
    "on",
    "wet",
    "pavement",
    "car",
    "passing",
    "by",
    "slowly",
    "while",
    "dog",
    "waits",
    "for",
    "its",
    "owner",
    "outside",
    "cafe",
    "morning",
    "coffee",
    "newspaper",
    "table",
    "chair",
    "window",
    "view",
    "mountains",
    "river",
    "valley",
    "forest",
    "trees",
    "green",
    "leaves",
    "autumn",
    "colours",
    "orange",
    "red",
    "yellow",
    "sky",
    "clouds",
    "sunset",
    "ocean",
    "waves",
    "beach",
    "sand",
    "children",
    "playing",
    "football",
    "park",
    "bench",
    "old",
    "man",
    "reading",
    "book",
    "woman",
    "riding",
    "bicycle",
    "train",
    "station",
    "platform",
    "travellers",
    "luggage",
    "announcement",
    "delayed",
    "because",
    "weather",
    "storm",
    "snow",
    "winter",
    "kitchen",
    "cooking",
    "dinner",
    "family",
    "recipe",
    "tomatoes",
    "garlic",
    "olive",
    "oil",
    "bread",
    "cheese",
    "wine",
    "market",
    "fresh",
    "fruit",
    "vegetables",
    "price",
    "customer",
    "service",
    "quality",
    "product",
    "review",
    "excellent",
    "terrible",
    "shipping",
    "arrived",
    "broken",
    "refund",
    "support",
    "ticket",
    "question",
    "answer",
    "search",
    "query",
    "document",
    "retrieval",
    "embedding",
    "vector",
    "similarity",
    "cosine",
    "distance",
    "nearest",
    "neighbour",
    "index",
    "database",
    "server",
    "client",
    "network",
    "connection",
    "timeout",
    "error",
    "retry",
    "success",
    "how",
    "do",
    "i",
    "reset",
    "my",
    "password",
    "account",
    "settings",
    "privacy",
    "policy",
    "terms",
    "conditions",
    "invoice",
    "payment",
    "credit",
    "card",
    "declined",
    "bank",
    "transfer",
    "balance",
];

/// Parses a `--temperature` value: a number in OpenAI's range, 0 to 2.
pub fn parse_temperature(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(t) if (0.0..=2.0).contains(&t) => Ok(t),
        _ => Err(format!(
            "`{text}` is not a temperature: give a number between 0 and 2 (0 is greedy)"
        )),
    }
}

/// The built-in generation workloads: prompts from [`texts`], `max_tokens` drawn from
/// `output_tokens`, streamed with the final usage chunk (output tokens counted by the server).
fn generation(chat: bool, o: &TextOptions) -> Workload {
    let mut rng = StdRng::seed_from_u64(o.seed ^ 0x6f75_7470);
    let bodies = texts(BUILTIN_BODIES, o)
        .into_iter()
        .map(|t| {
            let mut body = if chat {
                serde_json::json!({"messages": [{"role": "user", "content": t}]})
            } else {
                serde_json::json!({"prompt": t})
            };
            body["max_tokens"] = o.output_tokens.sample(&mut rng).into();
            if o.ignore_eos {
                body["ignore_eos"] = true.into();
            }
            if let Some(t) = o.temperature {
                body["temperature"] = t.into();
            }
            if o.stream {
                body["stream"] = true.into();
                body["stream_options"] = serde_json::json!({"include_usage": true});
            }
            Bytes::from(body.to_string())
        })
        .collect();
    Workload {
        name: if chat { "chat" } else { "completions" }.into(),
        path: if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        }
        .into(),
        bodies,
        stream: o.stream,
    }
}

/// Generates `n` texts with log-normal word counts (3..=400 words), deterministically.
pub fn texts(n: usize, o: &TextOptions) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let len =
        LogNormal::new(o.median_words.max(1.0).ln(), o.sigma.max(0.0)).expect("valid log-normal");
    (0..n)
        .map(|_| {
            let words = (len.sample(&mut rng).round() as usize).clamp(3, 400);
            let mut s = String::with_capacity(words * 7);
            for i in 0..words {
                if i > 0 {
                    s.push(' ');
                }
                s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            }
            s.push('.');
            s
        })
        .collect()
}

/// How many distinct bodies the built-in workloads pre-build (cycled during the run).
pub const BUILTIN_BODIES: usize = 1024;

/// Tokens a streamed body is taken to ask for when it names no `max_tokens`: only sizes the
/// generator ([`Workload::events_per_request`]), where guessing high costs an idle thread and
/// guessing low a saturated one.
const UNSTATED_MAX_TOKENS: f64 = 128.0;

impl Workload {
    /// Mean response events the generator handles per request: 1 for a response read whole,
    /// and for a streamed one its `max_tokens` (the mean over the bodies; a server stops at it
    /// or earlier, so this is an upper estimate) plus the opening and closing chunks. A pacer's
    /// work grows with it: one streamed request of 72 tokens cost a pacer about as much as 38
    /// one-shot requests on the H200 host (results/generate-2xh200).
    pub fn events_per_request(&self) -> f64 {
        if !self.stream || self.bodies.is_empty() {
            return 1.0;
        }
        let tokens: f64 = self
            .bodies
            .iter()
            .map(|b| {
                serde_json::from_slice::<serde_json::Value>(b)
                    .ok()
                    .and_then(|v| {
                        ["max_tokens", "max_completion_tokens"]
                            .iter()
                            .find_map(|k| v.get(*k).and_then(|n| n.as_f64()))
                    })
                    .unwrap_or(UNSTATED_MAX_TOKENS)
            })
            .sum();
        tokens / self.bodies.len() as f64 + 2.0
    }

    /// `embeddings`, `completions` or `chat`, or a `.jsonl` file of request bodies.
    pub fn from_spec(spec: &str, o: &TextOptions) -> Result<Workload, String> {
        match spec {
            "embeddings" => {
                let t = texts(BUILTIN_BODIES * o.inputs_per_request.max(1), o);
                let bodies = t
                    .chunks(o.inputs_per_request.max(1))
                    .map(|c| {
                        let input = if c.len() == 1 {
                            serde_json::json!(c[0])
                        } else {
                            serde_json::json!(c)
                        };
                        Bytes::from(serde_json::json!({"input": input}).to_string())
                    })
                    .collect();
                Ok(Workload {
                    name: spec.into(),
                    path: "/v1/embeddings".into(),
                    bodies,
                    stream: false,
                })
            }
            "completions" | "chat" => Ok(generation(spec == "chat", o)),
            f if f.ends_with(".jsonl") => Self::from_jsonl(Path::new(f)),
            other => Err(format!(
                "unknown workload `{other}`; use embeddings, completions, chat or a FILE.jsonl"
            )),
        }
    }

    /// One JSON request body per line; blank lines skipped; every line must parse. A body with
    /// `"stream": true` makes the run record streaming timings. A trace line of the form
    /// `{"prompt": …, "output_tokens": N}` (or `"messages"` instead of `"prompt"`) becomes a
    /// streamed request for exactly N tokens (`max_tokens` N, `ignore_eos`).
    pub fn from_jsonl(path: &Path) -> Result<Workload, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut bodies = Vec::new();
        let mut stream = false;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
            if let Some(n) = v.get("output_tokens").and_then(|n| n.as_u64()) {
                let mut body = v.clone();
                let obj = body.as_object_mut().ok_or_else(|| {
                    format!(
                        "{}:{}: a trace line must be an object",
                        path.display(),
                        i + 1
                    )
                })?;
                obj.remove("output_tokens");
                obj.insert("max_tokens".into(), n.into());
                obj.insert("ignore_eos".into(), true.into());
                obj.insert("stream".into(), true.into());
                obj.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
                stream = true;
                bodies.push(Bytes::from(body.to_string()));
                continue;
            }
            stream |= v.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
            bodies.push(Bytes::from(line.trim().to_string()));
        }
        if bodies.is_empty() {
            return Err(format!("{} has no request bodies", path.display()));
        }
        let guess = if text.contains("\"messages\"") {
            "/v1/chat/completions"
        } else if text.contains("\"prompt\"") {
            "/v1/completions"
        } else {
            "/v1/embeddings"
        };
        Ok(Workload {
            name: path.display().to_string(),
            path: guess.into(),
            bodies,
            stream,
        })
    }

    /// A raw body template for other servers: `{{text}}` is replaced by a JSON-escaped text.
    pub fn from_template(template: &str, path: &str, o: &TextOptions) -> Result<Workload, String> {
        if !template.contains("{{text}}") {
            return Err("the body template has no {{text}} placeholder".into());
        }
        let bodies = texts(BUILTIN_BODIES, o)
            .into_iter()
            .map(|t| {
                let esc = serde_json::to_string(&t).expect("strings serialize");
                Bytes::from(template.replace("{{text}}", &esc[1..esc.len() - 1]))
            })
            .collect();
        Ok(Workload {
            name: "template".into(),
            path: path.into(),
            bodies,
            stream: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn length_distributions_parse_and_a_lognormal_cap_holds() {
        assert_eq!(Lengths::parse("64"), Ok(Lengths::Fixed(64)));
        assert_eq!(
            Lengths::parse("uniform:16:128"),
            Ok(Lengths::Uniform(16, 128))
        );
        assert_eq!(
            Lengths::parse("lognormal:32:1"),
            Ok(Lengths::LogNormal(32.0, 1.0, 32_768))
        );
        let capped = Lengths::parse("lognormal:32:1.5:128").unwrap();
        assert_eq!(capped, Lengths::LogNormal(32.0, 1.5, 128));
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<usize> = (0..2000).map(|_| capped.sample(&mut rng)).collect();
        assert!(draws.iter().all(|&n| (1..=128).contains(&n)));
        // σ = 1.5 puts ~25% of draws above 4× the median: the cap is reached, not idle.
        assert!(draws.iter().filter(|&&n| n == 128).count() > 100);
        let err = Lengths::parse("lognormal:32:1:0").unwrap_err();
        assert!(err.contains("between 1 and 32768"), "{err}");
        assert!(Lengths::parse("lognormal:32").is_err());
    }

    #[test]
    fn texts_are_deterministic_with_a_median_near_the_option() {
        let o = TextOptions::default();
        let a = texts(2000, &o);
        assert_eq!(a, texts(2000, &o));
        let mut lens: Vec<usize> = a.iter().map(|t| t.split(' ').count()).collect();
        lens.sort();
        let median = lens[lens.len() / 2] as f64;
        assert!((median - 24.0).abs() <= 2.0, "median {median}");
    }

    #[test]
    fn builtin_and_file_workloads() {
        let o = TextOptions {
            inputs_per_request: 3,
            ..TextOptions::default()
        };
        let w = Workload::from_spec("embeddings", &o).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&w.bodies[0]).unwrap();
        assert_eq!(v["input"].as_array().unwrap().len(), 3);
        assert!(Workload::from_spec("chat", &o).unwrap().stream);
        let f = std::env::temp_dir().join(format!("lg-{}.jsonl", std::process::id()));
        std::fs::write(&f, "{\"input\": \"a\"}\n\n{\"input\": \"b\"}\n").unwrap();
        let w = Workload::from_spec(f.to_str().unwrap(), &o).unwrap();
        assert_eq!((w.bodies.len(), w.path.as_str()), (2, "/v1/embeddings"));
        std::fs::write(&f, "{\"input\": \"a\"}\nnot json\n").unwrap();
        assert!(Workload::from_spec(f.to_str().unwrap(), &o)
            .unwrap_err()
            .contains(":2: not JSON"));
        std::fs::remove_file(&f).ok();
        let t = Workload::from_template("{\"q\": \"{{text}}\"}", "/search", &o).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&t.bodies[0]).is_ok());
    }

    #[test]
    fn a_streamed_request_counts_its_token_events() {
        let o = TextOptions {
            output_tokens: Lengths::parse("uniform:16:128").unwrap(),
            ..TextOptions::default()
        };
        let w = Workload::from_spec("completions", &o).unwrap();
        let e = w.events_per_request();
        assert!((68.0..=80.0).contains(&e), "{e}");
        let one_shot = Workload::from_spec("embeddings", &o).unwrap();
        assert_eq!(one_shot.events_per_request(), 1.0);
        let unstated = Workload {
            bodies: vec![Bytes::from_static(b"{\"prompt\": \"a\", \"stream\": true}")],
            ..w
        };
        assert_eq!(unstated.events_per_request(), UNSTATED_MAX_TOKENS + 2.0);
    }

    #[test]
    fn generation_bodies_send_a_temperature_only_when_pinned() {
        let first = |o: &TextOptions| -> serde_json::Value {
            let w = Workload::from_spec("completions", o).unwrap();
            serde_json::from_slice(&w.bodies[0]).unwrap()
        };
        assert!(first(&TextOptions::default()).get("temperature").is_none());
        let pinned = TextOptions {
            temperature: Some(0.0),
            ..TextOptions::default()
        };
        assert_eq!(first(&pinned)["temperature"], 0.0);
    }

    #[test]
    fn temperatures_outside_the_api_range_are_refused() {
        assert_eq!(parse_temperature("0.7"), Ok(0.7));
        for bad in ["-1", "2.5", "hot", "NaN"] {
            let e = parse_temperature(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("0 and 2"), "{e}");
        }
    }
}
