//! Test-only hooks, compiled only with the cargo feature `test-hooks` (never in a release
//! build, so no production binary can be slowed or made to fail on purpose):
//!
//! - a planted slowdown (`runtime serve --test-slowdown 0.1`), which the CI performance gate is
//!   calibrated against;
//! - planted faults (`runtime serve --test-fault boom=panic`): a forward pass whose batch holds
//!   the word's tokens (in a generation step, in a prompt chunk) panics, fails, reports an
//!   exhausted device or runs slowly, so the
//!   reliability tests can check that only that batch's requests fail, on the embeddings batcher
//!   and on the generation engine alike.

use crate::model::{Backend, BackendError, Pending, Ready};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a planted fault does to the forward pass that meets its word.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// The forward panics.
    Panic,
    /// The forward returns an error.
    Error,
    /// The forward returns the error an exhausted CUDA device gives.
    OutOfMemory,
    /// The forward takes this much longer (then computes normally).
    Slow(Duration),
}

/// One planted fault: a word and what a forward containing it does.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// The trigger, tokenized with the served model's tokenizer at load.
    pub word: String,
    /// The fault.
    pub kind: FaultKind,
}

/// A `--test-fault` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("--test-fault {given:?}: {why} (expected WORD=panic|error|oom|slow:DURATION)")]
pub struct FaultRuleError {
    given: String,
    why: &'static str,
}

impl FromStr for FaultRule {
    type Err = FaultRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| FaultRuleError {
            given: s.into(),
            why,
        };
        let (word, kind) = s.split_once('=').ok_or_else(|| err("no `=`"))?;
        if word.trim().is_empty() {
            return Err(err("empty word"));
        }
        let kind = match kind {
            "panic" => FaultKind::Panic,
            "error" => FaultKind::Error,
            "oom" => FaultKind::OutOfMemory,
            k => match k.strip_prefix("slow:") {
                Some(d) => FaultKind::Slow(
                    profiles::parse_duration(d).map_err(|_| err("bad slow duration"))?,
                ),
                None => return Err(err("unknown fault")),
            },
        };
        Ok(FaultRule {
            word: word.trim().into(),
            kind,
        })
    }
}

/// Every hook `runtime serve` was given; the default plants nothing.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Throughput drops by this fraction (0.1 → every forward takes 1/0.9 as long); 0 = none.
    pub slowdown: f64,
    /// Planted faults.
    pub faults: Vec<FaultRule>,
}

/// Fault rules resolved to token ids, checked before each forward.
#[derive(Debug, Default)]
pub struct Armed {
    rules: Vec<(Vec<u32>, FaultKind)>,
}

impl Armed {
    /// Resolves each rule's word with `ids` (the word's tokens without special tokens); a word
    /// that yields no token is dropped with a warning.
    pub fn arm(rules: &[FaultRule], ids: impl Fn(&str) -> Vec<u32>) -> Armed {
        let rules = rules
            .iter()
            .filter_map(|r| {
                let t = ids(&r.word);
                if t.is_empty() {
                    tracing::warn!("--test-fault {:?}: the word has no tokens; ignored", r.word);
                    return None;
                }
                tracing::warn!("test-only fault planted: {:?} → {:?}", r.word, r.kind);
                Some((t, r.kind))
            })
            .collect();
        Armed { rules }
    }

    /// True when nothing is planted.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Applies the first rule whose tokens occur (contiguously) in one of `seqs`.
    pub fn check<'a>(&self, seqs: impl IntoIterator<Item = &'a [u32]>) -> Result<(), BackendError> {
        if self.rules.is_empty() {
            return Ok(());
        }
        for s in seqs {
            for (ids, kind) in &self.rules {
                if !s.windows(ids.len()).any(|w| w == ids.as_slice()) {
                    continue;
                }
                match *kind {
                    FaultKind::Panic => panic!("injected fault"),
                    FaultKind::Error => return Err(BackendError::Refused("injected error".into())),
                    FaultKind::OutOfMemory => {
                        return Err(BackendError::Candle(candle_core::Error::Msg(
                            "CUDA_ERROR_OUT_OF_MEMORY: out of memory (injected)".into(),
                        )))
                    }
                    FaultKind::Slow(d) => std::thread::sleep(d),
                }
            }
        }
        Ok(())
    }
}

/// An embeddings replica with the hooks around its forwards.
struct Hooked {
    inner: Arc<dyn Backend>,
    /// Extra time as a multiple of the forward's own time.
    extra: f64,
    faults: Arc<Armed>,
}

impl Backend for Hooked {
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, BackendError> {
        self.launch(batch).finish().map(|(v, _)| v)
    }

    /// Computes at launch (a hooked replica is a test double): the slowdown's sleep must follow
    /// the real work, and the pipelined worker's overlap would hide it.
    fn launch(&self, batch: &[&[u32]]) -> Box<dyn Pending> {
        let t = Instant::now();
        let out = match self.faults.check(batch.iter().copied()) {
            Ok(()) => self.inner.launch(batch).finish(),
            Err(e) => Err(e),
        };
        if self.extra > 0.0 {
            std::thread::sleep(t.elapsed().mul_f64(self.extra));
        }
        Box::new(Ready(out))
    }

    fn pipelined(&self) -> bool {
        self.inner.pipelined()
    }
}

/// Wraps every embeddings replica with the hooks (unchanged when none is planted).
pub fn hook_embed(
    replicas: Vec<(String, Arc<dyn Backend>)>,
    slowdown: f64,
    faults: Arc<Armed>,
) -> Vec<(String, Arc<dyn Backend>)> {
    let slow = slowdown > 0.0 && slowdown < 1.0;
    if !slow && faults.is_empty() {
        return replicas;
    }
    // Throughput × (1 − f) needs time × 1 / (1 − f): extra = f / (1 − f).
    let extra = if slow {
        slowdown / (1.0 - slowdown)
    } else {
        0.0
    };
    replicas
        .into_iter()
        .map(|(label, inner)| {
            let faults = faults.clone();
            let h = Hooked {
                inner,
                extra,
                faults,
            };
            (label, Arc::new(h) as Arc<dyn Backend>)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_bad_ones_name_the_problem() {
        let r: FaultRule = "boom=panic".parse().unwrap();
        assert_eq!(r.kind, FaultKind::Panic);
        let r: FaultRule = "slow=slow:250ms".parse().unwrap();
        assert_eq!(r.kind, FaultKind::Slow(Duration::from_millis(250)));
        for (bad, why) in [
            ("boom", "no `=`"),
            ("=panic", "empty word"),
            ("x=explode", "unknown fault"),
            ("x=slow:soon", "bad slow duration"),
        ] {
            let e = bad.parse::<FaultRule>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_rule_fires_only_on_its_contiguous_tokens() {
        let rules = vec![FaultRule {
            word: "ab".into(),
            kind: FaultKind::Error,
        }];
        let a = Armed::arm(&rules, |_| vec![7, 8]);
        assert!(a.check([&[1u32, 7, 9, 8][..]]).is_ok());
        assert!(a.check([&[1u32, 2][..], &[3, 7, 8][..]]).is_err());
    }
}
