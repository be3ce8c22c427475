//! GPT-2 style byte-level BPE, built from the GGUF's own `tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges`, so the token ids match the weights exactly.
//!
//! Pre-tokenisation follows SmolLM2's tokenizer (`tokenizer.ggml.pre = "smollm"`): every digit is
//! its own piece, then the GPT-2 regex splits the rest. Each piece's bytes are mapped to GPT-2's
//! printable "byte-to-unicode" characters and merged by rank.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use fancy_regex::Regex;

use super::gguf::GgufFile;

/// The GPT-2 pre-tokenisation regex (as in Hugging Face's ByteLevel pre-tokenizer); the trailing
/// `\s+` catches whitespace that `\s+(?!\S)` leaves (for example a newline before a word).
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GGUF token type of control tokens (`<|im_start|>` and friends).
const TOKEN_TYPE_CONTROL: i64 = 3;

pub struct Tokenizer {
    tokens: Vec<String>,
    /// Token text -> id, for [`Tokenizer::token_id`] (the tests look tokens up by text).
    #[cfg(test)]
    ids: HashMap<String, u32>,
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of the single-character token of each byte. SmolLM2's vocabulary lacks 21 of them
    /// (bytes that never occur in UTF-8 such as 0xC0, and rare controls such as 0x04); those
    /// encode as the unknown token, as they cannot round-trip anyway.
    byte_ids: [u32; 256],
    /// Character of GPT-2's byte-to-unicode table -> byte.
    char_to_byte: HashMap<char, u8>,
    /// Control tokens, longest first, for `encode_with_special`.
    specials: Vec<(String, u32)>,
    split: Regex,
    /// End-of-sequence token. The engine generates a fixed number of tokens (cold and warm runs
    /// are compared over equal lengths), so only the tests read it.
    #[allow(dead_code)]
    pub eos_id: Option<u32>,
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 upwards, so every byte string becomes a visible token string.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100.. are valid chars");
            next += 1;
            c
        };
    }
    table
}

impl Tokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
        let model = g.meta_str("tokenizer.ggml.model")?;
        ensure!(
            model == "gpt2",
            "tokenizer model {model:?} is not byte-level BPE (gpt2)"
        );
        let tokens: Vec<String> = g
            .meta_strings("tokenizer.ggml.tokens")?
            .into_iter()
            .map(String::from)
            .collect();
        let merges = g.meta_strings("tokenizer.ggml.merges")?;
        let types = g.meta_ints("tokenizer.ggml.token_type").unwrap_or_default();
        let eos_id = g
            .meta_u64("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|v| v as u32);
        let unknown_id = g.meta_u64("tokenizer.ggml.unknown_token_id").unwrap_or(0) as u32;
        Self::new(tokens, &merges, &types, eos_id, unknown_id)
    }

    pub fn new(
        tokens: Vec<String>,
        merges: &[&str],
        token_types: &[i64],
        eos_id: Option<u32>,
        unknown_id: u32,
    ) -> Result<Tokenizer> {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let to_char = bytes_to_unicode();
        let mut byte_ids = [unknown_id; 256];
        for (b, c) in to_char.iter().enumerate() {
            if let Some(id) = ids.get(&c.to_string()) {
                byte_ids[b] = *id;
            }
        }
        ensure!(
            b"abcxyzABC019 \n.,"
                .iter()
                .all(|b| byte_ids[*b as usize] != unknown_id),
            "vocabulary lacks byte tokens for plain ASCII; not a GPT-2 byte-level vocabulary"
        );
        let char_to_byte = to_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let (l, r) = m
                .split_once(' ')
                .with_context(|| format!("merge {m:?} has no space"))?;
            let id = |s: &str| {
                ids.get(s)
                    .copied()
                    .with_context(|| format!("merge {m:?} names unknown token {s:?}"))
            };
            let merged = id(&format!("{l}{r}"))?;
            merge_map
                .entry((id(l)?, id(r)?))
                .or_insert((rank as u32, merged));
        }
        let mut specials: Vec<(String, u32)> = token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(i, _)| (tokens[i].clone(), i as u32))
            .filter(|(s, _)| !s.is_empty())
            .collect();
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(Tokenizer {
            tokens,
            #[cfg(test)]
            ids,
            merges: merge_map,
            byte_ids,
            char_to_byte,
            specials,
            split: Regex::new(GPT2_SPLIT).context("compiling the GPT-2 split regex")?,
            eos_id,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    #[cfg(test)]
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// Encodes plain text; control-token strings in it are treated as ordinary text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3);
        for piece in self.pre_tokenize(text)? {
            self.bpe(piece, &mut out);
        }
        Ok(out)
    }

    /// Encodes text in which control tokens (`<|im_start|>`, `<|im_end|>`, ...) stand for
    /// themselves, as a chat template needs.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)));
            match next {
                Some((at, len, id)) => {
                    out.extend(self.encode(&rest[..at])?);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    out.extend(self.encode(rest)?);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Decodes ids to text; invalid UTF-8 (a multi-byte character cut between tokens) is replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(tok) = self.tokens.get(id as usize) else {
                continue;
            };
            if self.specials.iter().any(|(_, s)| *s == id) {
                bytes.extend(tok.as_bytes());
                continue;
            }
            for c in tok.chars() {
                match self.char_to_byte.get(&c) {
                    Some(b) => bytes.push(*b),
                    None => bytes.extend(c.to_string().as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Splits into pieces: each decimal digit alone (SmolLM2's `Digits(individual_digits)`), then
    /// GPT-2's regex over the text between digits. Text the regex does not match (it matches
    /// everything in practice) is kept as its own piece so no byte is ever dropped.
    fn pre_tokenize<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut pieces = Vec::new();
        let mut run_start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                self.split_run(&text[run_start..i], &mut pieces)?;
                pieces.push(&text[i..i + c.len_utf8()]);
                run_start = i + c.len_utf8();
            }
        }
        self.split_run(&text[run_start..], &mut pieces)?;
        Ok(pieces)
    }

    fn split_run<'t>(&self, run: &'t str, pieces: &mut Vec<&'t str>) -> Result<()> {
        let mut last = 0;
        for m in self.split.find_iter(run) {
            let m = m.context("pre-tokenizer regex failed")?;
            if m.start() > last {
                pieces.push(&run[last..m.start()]);
            }
            pieces.push(m.as_str());
            last = m.end();
        }
        if last < run.len() {
            pieces.push(&run[last..]);
        }
        Ok(())
    }

    /// Byte-pair merging of one piece: repeatedly merge the adjacent pair of lowest rank.
    /// Pieces are a handful of bytes, so the quadratic scan is cheaper than a heap.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = piece.bytes().map(|b| self.byte_ids[b as usize]).collect();
        loop {
            let best = ids
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0], w[1]))
                        .map(|(rank, merged)| (*rank, i, *merged))
                })
                .min();
            let Some((_, i, merged)) = best else { break };
            ids[i] = merged;
            ids.remove(i + 1);
        }
        out.extend(ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
