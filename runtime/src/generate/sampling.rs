//! Choosing the next token from logits (greedy, temperature, nucleus), and deciding how much of
//! the decoded text may be streamed while stop strings could still match.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How one request samples.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy (deterministic); higher flattens the distribution.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to this.
    pub top_p: f32,
    /// Seed of this request's generator; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// One sequence's sampler: its parameters and random generator.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from the request (or from entropy).
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// True when the next token is the argmax (temperature 0), which needs no host copy of the
    /// logits.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return crate::model::llama::argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p.1 / total;
                    acc >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        let mut x = self.rng.random::<f32>() * sum;
        for &(id, p) in &probs {
            if x < p {
                return id;
            }
            x -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Where the decoded output stands against the stop strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCheck {
    /// A stop string begins at this byte: the output ends there (the stop string excluded).
    Stopped(usize),
    /// No stop yet; bytes up to here are final and may be sent (the rest could be the start of
    /// a stop string, or half a UTF-8 character).
    Safe(usize),
}

/// Checks `text` (the whole output so far) against `stops`.
pub fn check_stops(text: &str, stops: &[String]) -> StopCheck {
    if let Some(at) = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        return StopCheck::Stopped(at);
    }
    let mut safe = text.len();
    // A decoder that has only half a character renders U+FFFD: hold it back.
    if text.ends_with('\u{FFFD}') {
        safe = text.len() - '\u{FFFD}'.len_utf8();
    }
    for s in stops {
        // The longest proper prefix of `s` that ends the text.
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                safe = safe.min(text.len() - i);
                break;
            }
        }
    }
    StopCheck::Safe(safe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_seeded_sampling_repeats() {
        let logits = [0.1, 2.0, 0.5, 1.9];
        let mut g = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(g.sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                seed: Some(seed),
            });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(
            draw(7).iter().any(|&t| t != 1),
            "temperature 1 should not be greedy"
        );
        // A tight nucleus keeps only the two top tokens.
        let mut n = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
        });
        assert!((0..50).all(|_| matches!(n.sample(&logits), 1 | 3)));
    }

    #[test]
    fn stop_strings_end_the_text_and_hold_back_partial_matches() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(check_stops("hello", &stops), StopCheck::Safe(5));
        assert_eq!(check_stops("hello\n", &stops), StopCheck::Safe(5));
        assert_eq!(check_stops("hello EN", &stops), StopCheck::Safe(6));
        assert_eq!(check_stops("hello END more", &stops), StopCheck::Stopped(6));
        assert_eq!(check_stops("a\n\nb", &stops), StopCheck::Stopped(1));
        assert_eq!(check_stops("caf\u{FFFD}", &[]), StopCheck::Safe(3));
    }
}
