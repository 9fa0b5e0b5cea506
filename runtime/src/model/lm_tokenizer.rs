//! Tokenizers for generation: text to ids for prompts, ids back to text for outputs.
//!
//! Two kinds: the built-in one of the synthetic decoders (no vocabulary file), and a Hugging Face
//! `tokenizers` pipeline, loaded from `tokenizer.json` or built from a GGUF file's metadata
//! (byte-level BPE: tokens and merges) by [`crate::model::gguf`].

use super::tokenize::TokenizeError;

/// Special tokens of the ChatML convention SmolLM2 and Qwen2 use, at SmolLM2's ids. The
/// built-in tokenizer reserves ids below [`FIRST_WORD`] for them.
const SPECIALS: &[(&str, u32)] = &[("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)];
/// First id the built-in tokenizer gives a word piece.
const FIRST_WORD: u32 = 16;

enum Inner {
    Builtin { vocab: u32 },
    Hf(Box<tokenizers::Tokenizer>),
}

/// A generation tokenizer: encodes prompts (special-token strings such as `<|im_start|>` in the
/// text become their ids, so a rendered chat template tokenizes as the model was trained) and
/// decodes outputs without special tokens.
pub struct LmTokenizer {
    inner: Inner,
}

impl LmTokenizer {
    /// The built-in tokenizer of the synthetic decoders: words and punctuation hashed (FNV-1a)
    /// into `[16, vocab)`, pieces of at most 6 characters, so token counts track a real BPE's
    /// roughly (about 1.3 tokens per English word); ids decode to pronounceable pseudo-words.
    /// Random weights produce random ids, so output text is gibberish by construction.
    pub fn builtin(vocab: usize) -> Self {
        LmTokenizer {
            inner: Inner::Builtin {
                vocab: vocab as u32,
            },
        }
    }

    /// A Hugging Face tokenizer (from `tokenizer.json` or GGUF metadata).
    pub fn hf(t: tokenizers::Tokenizer) -> Self {
        LmTokenizer {
            inner: Inner::Hf(Box::new(t)),
        }
    }

    /// Loads `tokenizer.json`, with padding and truncation off so lengths are true lengths.
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenizeError> {
        let load = |reason: String| TokenizeError::Load {
            source_name: path.display().to_string(),
            reason,
        };
        let mut t = tokenizers::Tokenizer::from_file(path).map_err(|e| load(e.to_string()))?;
        t.with_padding(None);
        t.with_truncation(None).map_err(|e| load(e.to_string()))?;
        Ok(Self::hf(t))
    }

    /// The id of a special token's text, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Builtin { .. } => SPECIALS.iter().find(|(t, _)| *t == token).map(|(_, i)| *i),
            Inner::Hf(t) => t.token_to_id(token),
        }
    }

    /// Ids of `text`. No BOS or other special token is added: prompts that need them (chat
    /// templates) carry them as text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        match &self.inner {
            Inner::Builtin { vocab } => Ok(builtin_encode(text, *vocab)),
            Inner::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizeError::Encode(e.to_string())),
        }
    }

    /// Text of `ids`, special tokens left out. An incomplete UTF-8 sequence at the end (a
    /// character split over byte tokens) decodes to U+FFFD, which streaming holds back.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        match &self.inner {
            Inner::Builtin { .. } => Ok(ids
                .iter()
                .filter(|&&i| i >= FIRST_WORD)
                .map(|&i| pseudo_word(i))
                .collect()),
            Inner::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| TokenizeError::Encode(e.to_string())),
        }
    }
}

/// Decodes a growing output a few tokens at a time instead of from its start at every token
/// (which costs O(length) per token: at 256 sequences of 64 tokens, an H200 step spent more time
/// in the tokenizer than in the model). The window starts one confirmed token back, so
/// decoders that treat the first token of a decode specially (a leading space) see the same
/// context as in a whole decode; a window whose text ends in U+FFFD (half a character) is not
/// confirmed until the character completes. TGI and vLLM stream the same way.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    /// Text of `ids[..read]`, final.
    text: String,
    /// Start of the decode window (one confirmed token of context).
    prefix: usize,
    /// End of the confirmed tokens.
    read: usize,
}

impl Detokenizer {
    /// The text of `ids`, the whole output so far (it only ever grows between calls), as
    /// [`LmTokenizer::decode`] would render it (a trailing half character as U+FFFD).
    pub fn text(&mut self, tok: &LmTokenizer, ids: &[u32]) -> Result<String, TokenizeError> {
        if ids.len() < self.read {
            *self = Detokenizer::default();
        }
        let head = tok.decode(&ids[self.prefix..self.read])?;
        let window = tok.decode(&ids[self.prefix..])?;
        let Some(tail) = window.strip_prefix(head.as_str()) else {
            // The window does not extend its head (a decoder that rewrites earlier text):
            // start again from a whole decode.
            let whole = tok.decode(ids)?;
            if !whole.ends_with('\u{FFFD}') {
                self.text = whole.clone();
                self.read = ids.len();
                self.prefix = self.read.saturating_sub(1);
            }
            return Ok(whole);
        };
        if tail.is_empty() || tail.ends_with('\u{FFFD}') {
            return Ok(format!("{}{tail}", self.text));
        }
        self.text.push_str(tail);
        self.prefix = self.read;
        self.read = ids.len();
        Ok(self.text.clone())
    }
}

fn fnv(piece: &str, continuation: bool) -> u32 {
    let mut h: u32 = 0x811c_9dc5 ^ if continuation { 0x5a5a } else { 0 };
    for b in piece.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn builtin_encode(text: &str, vocab: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        // The earliest special token in the rest, if any.
        let next = SPECIALS
            .iter()
            .filter_map(|(t, id)| rest.find(t).map(|at| (at, *t, *id)))
            .min_by_key(|(at, _, _)| *at);
        let (plain, special) = match next {
            Some((at, t, id)) => (&rest[..at], Some((t, id))),
            None => (rest, None),
        };
        for word in plain.split_whitespace() {
            let mut piece = String::new();
            let flush = |piece: &mut String, ids: &mut Vec<u32>| {
                let chars: Vec<char> = piece.chars().collect();
                for (i, c) in chars.chunks(6).enumerate() {
                    let s: String = c.iter().collect();
                    ids.push(FIRST_WORD + fnv(&s, i > 0) % (vocab - FIRST_WORD));
                }
                piece.clear();
            };
            for c in word.chars() {
                if c.is_alphanumeric() {
                    piece.push(c);
                } else {
                    flush(&mut piece, &mut ids);
                    piece.push(c);
                    flush(&mut piece, &mut ids);
                }
            }
            flush(&mut piece, &mut ids);
        }
        match special {
            Some((t, id)) => {
                ids.push(id);
                rest = &rest[plain.len() + t.len()..];
            }
            None => break,
        }
    }
    ids
}

/// A deterministic pronounceable word for a built-in id, with its leading space.
fn pseudo_word(id: u32) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut n = id;
    let mut w = String::from(" ");
    for _ in 0..2 + id % 2 {
        w.push(C[(n % C.len() as u32) as usize] as char);
        n /= C.len() as u32;
        w.push(V[(n % V.len() as u32) as usize] as char);
        n /= V.len() as u32;
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parses_special_tokens_and_decodes_words() {
        let t = LmTokenizer::builtin(49152);
        let ids = t
            .encode("<|im_start|>user\nHello, world!<|im_end|>\n")
            .unwrap();
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&2));
        // user hello , world ! = 5 pieces between the specials
        assert_eq!(ids.len(), 7, "{ids:?}");
        assert!(ids.iter().all(|&i| i < 49152));
        assert_eq!(t.encode("abc def").unwrap(), t.encode("abc  def").unwrap());
        let text = t.decode(&[0, 1, 100, 2, 4000]).unwrap();
        assert_eq!(text.split_whitespace().count(), 2, "{text:?}");
        assert_eq!(t.token_id("<|im_end|>"), Some(2));
    }

    /// Feeds `ids` one token at a time and checks every step against a whole decode.
    fn incremental_matches_whole(t: &LmTokenizer, ids: &[u32]) {
        let mut d = Detokenizer::default();
        for n in 1..=ids.len() {
            assert_eq!(
                d.text(t, &ids[..n]).unwrap(),
                t.decode(&ids[..n]).unwrap(),
                "after {n} tokens"
            );
        }
    }

    #[test]
    fn incremental_decoding_equals_whole_decoding() {
        let t = LmTokenizer::builtin(49152);
        incremental_matches_whole(
            &t,
            &t.encode("Hello, world! The capital of France is").unwrap(),
        );
        // Byte-level BPE with no merges: every byte is a token, so multi-byte characters
        // arrive in pieces and the text ends in U+FFFD between them.
        let alphabet: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
            .into_iter()
            .map(String::from)
            .collect();
        let types = vec![1; alphabet.len()];
        let t = crate::model::gguf::bpe_tokenizer(&alphabet, &[], &types).unwrap();
        let ids = t.encode("café 東京 — naïve 🙂 end").unwrap();
        assert!(ids.len() > 20, "{ids:?}");
        incremental_matches_whole(&t, &ids);
    }

    #[test]
    fn incremental_decoding_with_the_real_smollm2_tokenizer() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        );
        if !std::path::Path::new(path).exists() {
            eprintln!("skipped: {path} is absent (scripts/fetch-smollm2.sh)");
            return;
        }
        let m =
            crate::model::gguf::read(std::path::Path::new(path), candle_core::DType::F32).unwrap();
        let text = "The capital of France is Paris.\n  Indented — «quoted» 東京, 3.14159 and 🙂!";
        incremental_matches_whole(&m.tokenizer, &m.tokenizer.encode(text).unwrap());
    }
}
