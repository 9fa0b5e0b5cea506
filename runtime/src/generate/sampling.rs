//! Choosing the next token from logits (greedy, temperature, nucleus), and deciding how much of
//! the decoded text may be streamed while stop strings could still match.

use candle_core::Tensor;
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

/// Where a row of logits is turned into a token. Copying a row to the host costs `vocab` floats
/// (600 KB for Qwen2.5's 151,936) and a host pass over it, per sequence per step: on an H200 a
/// closed loop of 64 clients sampling on the host did not finish in 60 s what it served in 25 s
/// with sampling on the device. So only what needs the host goes there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Placement {
    /// Temperature 0: the argmax, on the device.
    Greedy,
    /// Plain temperature sampling without a seed: the Gumbel-max trick on the device
    /// (`argmax(logits / T + G)` with G standard Gumbel noise is a draw from
    /// `softmax(logits / T)`), noise hashed from a fresh seed per step ([`crate::model::draw`]).
    Device {
        /// The request's temperature (> 0).
        temperature: f32,
    },
    /// Nucleus sampling or a seeded request (reproducible draws from the request's own
    /// generator): the row comes to the host.
    Host,
}

/// The token of every row of `[rows, vocab]` `logits` (f32, f16 or bf16) placed `Greedy` or `Device` (rows
/// placed `Host` get an arbitrary id the caller replaces), computed where the logits are, in
/// one pass ([`crate::model::draw`]), its noise keyed by a fresh seed per step.
pub fn sample_on_device(logits: &Tensor, placement: &[Placement]) -> candle_core::Result<Vec<u32>> {
    draw_on_device(logits, placement)?.to_vec1::<u32>()
}

/// [`sample_on_device`], its ids left on the device (`[rows]` u32) for a step that overlaps
/// the next one ([`crate::model::readback`]).
pub fn draw_on_device(logits: &Tensor, placement: &[Placement]) -> candle_core::Result<Tensor> {
    let inv_temp: Vec<f32> = placement
        .iter()
        .map(|p| match p {
            Placement::Device { temperature } => 1.0 / temperature,
            Placement::Greedy | Placement::Host => 0.0,
        })
        .collect();
    crate::model::draw::draw_ids(logits, &inv_temp, rand::random())
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

    /// Where this sampler's next token can be drawn: see [`Placement`].
    pub fn placement(&self) -> Placement {
        let p = &self.params;
        if p.temperature <= 0.0 {
            Placement::Greedy
        } else if p.top_p >= 1.0 && p.seed.is_none() {
            Placement::Device {
                temperature: p.temperature,
            }
        } else {
            Placement::Host
        }
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
    use candle_core::Device;

    #[test]
    fn device_sampling_draws_from_the_softmax_and_leaves_greedy_rows_greedy() {
        // 4,000 rows of the same two logits, p = (0.7, 0.3) at temperature 1, and one greedy
        // row whose argmax is the unlikely-looking second token.
        let n = 4000;
        let mut flat: Vec<f32> = (0..n).flat_map(|_| [0.7f32.ln(), 0.3f32.ln()]).collect();
        flat.extend([0.0, 0.5]);
        let logits = Tensor::from_vec(flat, (n + 1, 2), &Device::Cpu).unwrap();
        let mut place = vec![Placement::Device { temperature: 1.0 }; n];
        place.push(Placement::Greedy);
        let t = sample_on_device(&logits, &place).unwrap();
        assert_eq!(t[n], 1);
        let zeros = t[..n].iter().filter(|&&x| x == 0).count() as f64 / n as f64;
        // σ = √(0.21 / 4000) ≈ 0.007: ±0.04 is more than 5σ.
        assert!((zeros - 0.7).abs() < 0.04, "share of token 0: {zeros}");
        // A low temperature sharpens the same draw towards the argmax.
        let cold = sample_on_device(
            &logits,
            &vec![Placement::Device { temperature: 0.05 }; n + 1],
        )
        .unwrap();
        assert!(cold[..n].iter().all(|&x| x == 0));
    }

    #[test]
    fn rows_at_different_temperatures_share_a_step() {
        // One row at 1 (p = 0.7 / 0.3), one near 0 (always the argmax), one greedy.
        let n = 2000;
        let mut flat: Vec<f32> = Vec::new();
        let mut place = Vec::new();
        for _ in 0..n {
            flat.extend([0.7f32.ln(), 0.3f32.ln()]);
            place.push(Placement::Device { temperature: 1.0 });
            flat.extend([0.7f32.ln(), 0.3f32.ln()]);
            place.push(Placement::Device { temperature: 0.02 });
            flat.extend([0.0, 0.5]);
            place.push(Placement::Greedy);
        }
        let logits = Tensor::from_vec(flat, (3 * n, 2), &Device::Cpu).unwrap();
        let t = sample_on_device(&logits, &place).unwrap();
        let warm = (0..n).filter(|i| t[3 * i] == 0).count() as f64 / n as f64;
        // σ = √(0.21 / 2000) ≈ 0.01: ±0.05 is 5σ.
        assert!(
            (warm - 0.7).abs() < 0.05,
            "share of token 0 at T = 1: {warm}"
        );
        assert!((0..n).all(|i| t[3 * i + 1] == 0 && t[3 * i + 2] == 1));
    }

    #[test]
    fn only_seeded_or_nucleus_requests_need_the_host() {
        let p = |temperature, top_p, seed| {
            Sampler::new(SamplingParams {
                temperature,
                top_p,
                seed,
            })
            .placement()
        };
        assert_eq!(p(0.0, 0.5, Some(1)), Placement::Greedy);
        assert_eq!(p(0.8, 1.0, None), Placement::Device { temperature: 0.8 });
        assert_eq!(p(0.8, 0.9, None), Placement::Host);
        assert_eq!(p(0.8, 1.0, Some(7)), Placement::Host);
    }

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
