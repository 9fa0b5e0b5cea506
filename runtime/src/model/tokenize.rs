//! Tokenizers: the built-in one for the synthetic model, and Hugging Face `tokenizer.json`.

use std::path::Path;

/// Why text could not be turned into ids (or a tokenizer could not be built).
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The tokenizer file or metadata is unusable.
    #[error("cannot load tokenizer {source_name}: {reason}")]
    Load {
        /// The file or metadata it came from.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer failed on this text.
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Turns text into token ids, special tokens included; the length decides batch token budgets.
pub trait Tokenize: Send + Sync {
    /// Token ids for one input, `[CLS] … [SEP]` included. Inputs longer than the model allows are
    /// returned in full so that the caller can refuse them with their true length.
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError>;
}

/// Bytes of text per allowed token tokenized before the rest: real text runs 3–6 bytes a
/// token, so this prefix of a too-long input already holds more tokens than allowed.
const PREFIX_BYTES_PER_TOKEN: usize = 16;

/// What [`encode_within`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    /// The whole input's ids.
    Ids(Vec<u32>),
    /// Longer than the limit: at least this many tokens (only a prefix was tokenized).
    AtLeast(usize),
}

/// Tokenizes `text` with `encode` unless it is certainly longer than `limit` tokens. A long input is first
/// tokenized up to a whitespace break after `(limit + 1) × 16` bytes; when that prefix is
/// already over the limit the input is refused without tokenizing the rest: an 8 MB input
/// otherwise costs its full tokenization (hundreds of ms of a blocking thread) only to be
/// refused, which raised normal traffic's p95 several-fold under a stream of such inputs.
/// Cutting at whitespace keeps the prefix's count a lower bound of the whole's for
/// whitespace-splitting tokenizers (BERT's, SentencePiece's, byte-level BPE's).
pub fn encode_within<E>(
    encode: impl Fn(&str) -> Result<Vec<u32>, E>,
    text: &str,
    limit: usize,
) -> Result<Encoded, E> {
    let budget = limit
        .saturating_add(1)
        .saturating_mul(PREFIX_BYTES_PER_TOKEN);
    if text.len() > budget {
        let mut cut = budget;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(ws) = text[..cut].rfind(char::is_whitespace) {
            let n = encode(&text[..ws])?.len();
            if n > limit {
                return Ok(Encoded::AtLeast(n));
            }
        }
    }
    encode(text).map(Encoded::Ids)
}

/// BERT's special ids in the uncased vocabulary all-MiniLM-L6-v2 uses.
const CLS: u32 = 101;
const SEP: u32 = 102;
/// First id the built-in tokenizer hands out; below it sit BERT's special and unused ids.
const FIRST_PIECE: u32 = 1000;

/// A deterministic word-piece tokenizer needing no vocabulary file: BERT's basic split (lowercase,
/// whitespace, punctuation as its own token), words cut into pieces of at most 6 characters, each
/// piece hashed (FNV-1a) into the vocabulary. Token counts track a real WordPiece tokenizer's
/// closely enough for batching and budgets, which is all the synthetic model needs.
pub struct BuiltinTokenizer {
    vocab_size: u32,
}

impl BuiltinTokenizer {
    /// A tokenizer whose ids fall in `[FIRST_PIECE, vocab_size)`.
    pub fn new(vocab_size: usize) -> Self {
        BuiltinTokenizer {
            vocab_size: vocab_size as u32,
        }
    }

    fn piece_id(&self, piece: &str, continuation: bool) -> u32 {
        let mut h: u32 = if continuation {
            0x811c_9dc5 ^ 0x5a5a
        } else {
            0x811c_9dc5
        };
        for b in piece.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        FIRST_PIECE + h % (self.vocab_size - FIRST_PIECE)
    }
}

impl Tokenize for BuiltinTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = vec![CLS];
        let lower = text.to_lowercase();
        for word in lower.split(|c: char| c.is_whitespace()) {
            let mut start = None;
            let flush = |from: usize, to: usize, ids: &mut Vec<u32>| {
                let w: Vec<char> = word[from..to].chars().collect();
                for (i, chunk) in w.chunks(6).enumerate() {
                    let piece: String = chunk.iter().collect();
                    ids.push(self.piece_id(&piece, i > 0));
                }
            };
            for (i, c) in word.char_indices() {
                if c.is_ascii_punctuation() || (!c.is_alphanumeric() && !c.is_whitespace()) {
                    if let Some(s) = start.take() {
                        flush(s, i, &mut ids);
                    }
                    flush(i, i + c.len_utf8(), &mut ids);
                } else if start.is_none() {
                    start = Some(i);
                }
            }
            if let Some(s) = start {
                flush(s, word.len(), &mut ids);
            }
        }
        ids.push(SEP);
        Ok(ids)
    }
}

/// A Hugging Face `tokenizer.json` (WordPiece for BERT models), with truncation and padding off
/// so lengths are true lengths.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
}

impl HfTokenizer {
    /// Loads `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self, TokenizeError> {
        let load = |reason: String| TokenizeError::Load {
            source_name: path.display().to_string(),
            reason,
        };
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| load(e.to_string()))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| load(format!("cannot disable truncation: {e}")))?;
        Ok(HfTokenizer { inner })
    }
}

impl Tokenize for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_long_input_is_refused_from_a_prefix_and_others_are_encoded_whole() {
        let t = BuiltinTokenizer::new(30522);
        let longest = std::cell::Cell::new(0usize);
        let enc = |x: &str| {
            longest.set(longest.get().max(x.len()));
            t.encode(x)
        };
        // 1 MB of words against a limit of 10 tokens: refused after ~176 bytes.
        let huge = "word ".repeat(200_000);
        match encode_within(enc, &huge, 10).unwrap() {
            Encoded::AtLeast(n) => assert!(n > 10, "{n}"),
            other => panic!("{other:?}"),
        }
        assert!(
            longest.get() <= 11 * PREFIX_BYTES_PER_TOKEN,
            "{}",
            longest.get()
        );
        // Within the limit: the whole input, the same ids as encode.
        let short = "the quick brown fox";
        assert_eq!(
            encode_within(|x| t.encode(x), short, 10).unwrap(),
            Encoded::Ids(t.encode(short).unwrap())
        );
        // Long but few tokens (mostly whitespace): encoded whole, and found within the limit.
        let sparse = format!("a{}b", " ".repeat(10_000));
        assert_eq!(
            encode_within(|x| t.encode(x), &sparse, 10).unwrap(),
            Encoded::Ids(t.encode(&sparse).unwrap())
        );
    }

    #[test]
    fn builtin_is_deterministic_and_bert_shaped() {
        let t = BuiltinTokenizer::new(30522);
        let a = t.encode("Hello, world! Tokenization works.").unwrap();
        assert_eq!(a, t.encode("hello, WORLD! tokenization works.").unwrap());
        assert_eq!(a[0], CLS);
        assert_eq!(*a.last().unwrap(), SEP);
        // hello , world ! tokeni zation works .  = 8 pieces + 2 specials
        assert_eq!(a.len(), 10, "{a:?}");
        assert!(a.iter().all(|&id| id < 30522));
        assert_eq!(t.encode("").unwrap(), vec![CLS, SEP]);
    }
}
