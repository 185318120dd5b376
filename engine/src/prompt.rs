//! Prompt syntax and chunking as AUTOMATIC1111's web UI reads prompts: `(word)` weighs ×1.1,
//! `[word]` ÷1.1, `(word:1.3)` ×1.3, `\(` is a literal bracket, `BREAK` starts a new chunk. Prompts
//! longer than 75 tokens are cut into 75-token chunks (at a comma in the last 20 tokens when there is
//! one); each chunk is encoded on its own and the embeddings are concatenated. A chunk is laid out as
//! diffusers pads a prompt (`<start> tokens <end> pad…`), so short prompts encode exactly as there.

use crate::error::{EngineError, Result};
use crate::tokenizer::{BOS, ClipTokenizer, EOS, MAX_LENGTH};

/// Tokens per chunk between the start and end markers.
pub const CHUNK_TOKENS: usize = MAX_LENGTH - 2;
/// More chunks than this is refused: 4,800 tokens is far past any useful prompt.
pub const MAX_CHUNKS: usize = 64;
/// How far back from a full chunk a comma may move the cut.
const COMMA_BACKTRACK: usize = 20;
/// `,</w>` in the CLIP vocabulary.
const COMMA: u32 = 267;

/// A run of prompt text with one weight, or a forced chunk break.
#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Text { text: String, weight: f32 },
    Break,
}

/// Splits a prompt into weighted runs of text.
pub fn parse(prompt: &str) -> Vec<Segment> {
    let mut texts: Vec<(String, f32)> = Vec::new();
    // Index into `texts` where each open bracket began.
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let scale = |texts: &mut Vec<(String, f32)>, from: usize, by: f32| {
        for (_, weight) in &mut texts[from..] {
            *weight *= by;
        }
    };
    let chars: Vec<char> = prompt.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() && "()[]\\".contains(chars[i + 1]) => {
                texts.push((chars[i + 1].to_string(), 1.0));
                i += 2;
                continue;
            }
            '(' => round.push(texts.len()),
            '[' => square.push(texts.len()),
            ':' if !round.is_empty() => {
                if let Some((weight, end)) = explicit_weight(&chars, i) {
                    let from = round.pop().expect("checked non-empty");
                    scale(&mut texts, from, weight);
                    i = end;
                    continue;
                }
                texts.push((":".into(), 1.0));
            }
            ')' if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                scale(&mut texts, from, 1.1);
            }
            ']' if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                scale(&mut texts, from, 1.0 / 1.1);
            }
            _ => {
                let start = i;
                while i < chars.len() && !"\\()[]:".contains(chars[i]) {
                    i += 1;
                }
                if i == start {
                    i += 1;
                }
                texts.push((chars[start..i].iter().collect(), 1.0));
                continue;
            }
        }
        i += 1;
    }
    // Brackets left open weigh everything after them.
    for from in round {
        scale(&mut texts, from, 1.1);
    }
    for from in square {
        scale(&mut texts, from, 1.0 / 1.1);
    }
    let mut segments: Vec<Segment> = Vec::new();
    for (text, weight) in texts {
        for (n, part) in split_breaks(&text).into_iter().enumerate() {
            if n > 0 {
                segments.push(Segment::Break);
            }
            match segments.last_mut() {
                Some(Segment::Text { text, weight: w }) if *w == weight => text.push_str(&part),
                _ => segments.push(Segment::Text { text: part, weight }),
            }
        }
    }
    segments.retain(|s| !matches!(s, Segment::Text { text, .. } if text.is_empty()));
    segments
}

/// `:1.3)` at `chars[at]`: the weight and the index after the `)`.
fn explicit_weight(chars: &[char], at: usize) -> Option<(f32, usize)> {
    let mut j = at + 1;
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    let start = j;
    while j < chars.len() && (chars[j].is_ascii_digit() || "+-.".contains(chars[j])) {
        j += 1;
    }
    let number: String = chars[start..j].iter().collect();
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    if j < chars.len() && chars[j] == ')' {
        number
            .parse::<f32>()
            .ok()
            .filter(|w| w.is_finite())
            .map(|w| (w, j + 1))
    } else {
        None
    }
}

/// Splits at the word `BREAK` (upper case, standing alone), dropping the whitespace around it.
fn split_breaks(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let words: Vec<&str> = text.split_inclusive(char::is_whitespace).collect();
    for word in words {
        if word.trim() == "BREAK" {
            let current = parts.last_mut().expect("never empty");
            *current = current.trim_end().to_owned();
            parts.push(String::new());
        } else {
            let after_break = parts.len() > 1;
            let current = parts.last_mut().expect("never empty");
            if current.is_empty() && after_break {
                current.push_str(word.trim_start());
            } else {
                current.push_str(word);
            }
        }
    }
    parts
}

/// The ids and per-token weights of one 77-token chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Chunk {
    /// Whether any token carries a weight other than 1.
    pub fn is_weighted(&self) -> bool {
        self.weights.iter().any(|&w| w != 1.0)
    }
}

/// A prompt cut into chunks, and how many tokens it has.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub chunks: Vec<Chunk>,
    /// Tokens of the prompt itself, without start, end or padding.
    pub token_count: usize,
}

/// Tokenizes `prompt` into chunks of at most 75 tokens.
pub fn tokenize(tokenizer: &ClipTokenizer, prompt: &str) -> Result<TokenizedPrompt> {
    let mut chunks = Vec::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut token_count = 0;
    let pad = tokenizer.pad_id();
    let close = |ids: &mut Vec<u32>, weights: &mut Vec<f32>, chunks: &mut Vec<Chunk>| {
        let mut chunk = Chunk {
            ids: Vec::with_capacity(MAX_LENGTH),
            weights: Vec::with_capacity(MAX_LENGTH),
        };
        chunk.ids.push(BOS);
        chunk.ids.append(ids);
        chunk.ids.push(EOS);
        chunk.ids.resize(MAX_LENGTH, pad);
        chunk.weights.push(1.0);
        chunk.weights.append(weights);
        chunk.weights.resize(MAX_LENGTH, 1.0);
        chunks.push(chunk);
    };
    for segment in parse(prompt) {
        let (text, weight) = match segment {
            Segment::Break => {
                close(&mut ids, &mut weights, &mut chunks);
                last_comma = None;
                continue;
            }
            Segment::Text { text, weight } => (text, weight),
        };
        for token in tokenizer.encode_plain(&text)? {
            token_count += 1;
            if token == COMMA {
                last_comma = Some(ids.len());
            } else if ids.len() == CHUNK_TOKENS {
                // Full: when a comma is recent, the words after it move to the next chunk.
                if let Some(comma) = last_comma.filter(|&c| ids.len() - c <= COMMA_BACKTRACK) {
                    let mut moved_ids = ids.split_off(comma + 1);
                    let mut moved_weights = weights.split_off(comma + 1);
                    close(&mut ids, &mut weights, &mut chunks);
                    ids.append(&mut moved_ids);
                    weights.append(&mut moved_weights);
                    last_comma = None;
                }
            }
            if ids.len() == CHUNK_TOKENS {
                close(&mut ids, &mut weights, &mut chunks);
                last_comma = None;
            }
            ids.push(token);
            weights.push(weight);
        }
    }
    if !ids.is_empty() || chunks.is_empty() {
        close(&mut ids, &mut weights, &mut chunks);
    }
    if chunks.len() > MAX_CHUNKS {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt has {token_count} tokens; the limit is {} ({MAX_CHUNKS} chunks of {CHUNK_TOKENS})",
            MAX_CHUNKS * CHUNK_TOKENS
        )));
    }
    Ok(TokenizedPrompt {
        chunks,
        token_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: &str, weight: f32) -> Segment {
        Segment::Text {
            text: text.into(),
            weight,
        }
    }

    fn assert_segments(prompt: &str, expected: &[Segment]) {
        let got = parse(prompt);
        assert_eq!(got.len(), expected.len(), "{prompt}: {got:?}");
        for (g, e) in got.iter().zip(expected) {
            match (g, e) {
                (Segment::Text { text: a, weight: x }, Segment::Text { text: b, weight: y }) => {
                    assert_eq!(a, b, "{prompt}");
                    assert!((x - y).abs() < 1e-5, "{prompt}: {a} weighs {x}, not {y}");
                }
                (a, b) => assert_eq!(a, b, "{prompt}"),
            }
        }
    }

    #[test]
    fn emphasis_as_a1111_reads_it() {
        assert_segments("a cat", &[text("a cat", 1.0)]);
        assert_segments("a (cat)", &[text("a ", 1.0), text("cat", 1.1)]);
        assert_segments("a ((cat))", &[text("a ", 1.0), text("cat", 1.21)]);
        assert_segments("a [cat]", &[text("a ", 1.0), text("cat", 1.0 / 1.1)]);
        assert_segments(
            "a (cat:1.5) dog",
            &[text("a ", 1.0), text("cat", 1.5), text(" dog", 1.0)],
        );
        assert_segments(
            "(a (cat:2)):0.5",
            &[text("a ", 1.1), text("cat", 2.2), text(":0.5", 1.0)],
        );
        assert_segments(r"a \(cat\)", &[text("a (cat)", 1.0)]);
        assert_segments("a (cat", &[text("a ", 1.0), text("cat", 1.1)]);
        assert_segments("a cat)", &[text("a cat)", 1.0)]);
        assert_segments("time: noon", &[text("time: noon", 1.0)]);
        assert_segments(
            "a cat BREAK a dog",
            &[text("a cat", 1.0), Segment::Break, text("a dog", 1.0)],
        );
        assert_segments("", &[]);
    }
}
