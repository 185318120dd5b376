//! The CLIP BPE tokenizer on the `tokenizers` crate, as diffusers' pipelines call transformers'
//! `CLIPTokenizer`: `<|startoftext|>` + tokens + `<|endoftext|>`, truncated and padded to 77.
//!
//! A diffusers folder's `tokenizer/` is used when present (`tokenizer.json`, or the older
//! `vocab.json` + `merges.txt`); single-file checkpoints use the real CLIP vocabulary embedded from
//! `assets/clip/` (MIT, see its LICENSE.md). SD1 pads with `<|endoftext|>`; SD2 pads with `!`,
//! which transformers registers as a special token, so a `!` in a prompt also becomes id 0 there.

use std::path::Path;
use std::str::FromStr;

use tokenizers::{AddedToken, Tokenizer};

use crate::error::{EngineError, Result};

/// The tokenizer.json built from OpenAI's CLIP vocabulary by `tools/reference/make_tokenizer.py`.
pub const DEFAULT_TOKENIZER: &str = include_str!("../../assets/clip/tokenizer.json");

/// Sequence length of the CLIP text encoders Stable Diffusion uses.
pub const MAX_LENGTH: usize = 77;
pub const BOS: u32 = 49406;
pub const EOS: u32 = 49407;

/// What fills a prompt's ids up to [`MAX_LENGTH`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PadToken {
    /// `<|endoftext|>` (SD1).
    EndOfText,
    /// Any other token, registered as special (SD2 uses `!`).
    Special(String),
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

fn tokenizer_error(what: &str, error: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(format!("{what}: {error}"))
}

impl ClipTokenizer {
    /// The embedded CLIP vocabulary.
    pub fn builtin(pad: &PadToken) -> Result<Self> {
        let inner = Tokenizer::from_str(DEFAULT_TOKENIZER)
            .map_err(|e| tokenizer_error("the built-in CLIP vocabulary", e))?;
        Self::with_pad(inner, pad)
    }

    /// The tokenizer of a diffusers folder's `tokenizer/`; `default_pad` applies when its
    /// configuration names none.
    pub fn from_folder(dir: &Path, default_pad: &PadToken) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| tokenizer_error(&json.display().to_string(), e))?
        } else {
            from_vocab_and_merges(dir)?
        };
        let pad = configured_pad(dir)?.unwrap_or_else(|| default_pad.clone());
        Self::with_pad(inner, &pad)
    }

    fn with_pad(mut inner: Tokenizer, pad: &PadToken) -> Result<Self> {
        let pad_id = match pad {
            PadToken::EndOfText => EOS,
            PadToken::Special(token) => {
                inner
                    .add_special_tokens([AddedToken::from(token.clone(), true)])
                    .map_err(|e| tokenizer_error("adding the pad token", e))?;
                inner.token_to_id(token).ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "the pad token '{token}' is not in the vocabulary"
                    ))
                })?
            }
        };
        inner
            .with_truncation(None)
            .map_err(|e| tokenizer_error("truncation", e))?;
        inner.with_padding(None);
        Ok(Self { inner, pad_id })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// All ids of `text`, `<|startoftext|>` and `<|endoftext|>` included, however long.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| tokenizer_error("encoding the prompt", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ids of `text` alone, without start and end markers.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| tokenizer_error("encoding the prompt", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The ids the text encoder takes for `text`: at most 75 tokens between the start and end
    /// markers, then padding to [`MAX_LENGTH`].
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.encode(text)?;
        let content = &ids[1..ids.len() - 1];
        let kept = &content[..content.len().min(MAX_LENGTH - 2)];
        let mut padded = Vec::with_capacity(MAX_LENGTH);
        padded.push(BOS);
        padded.extend_from_slice(kept);
        padded.push(EOS);
        padded.resize(MAX_LENGTH, self.pad_id);
        Ok(padded)
    }
}

/// A tokenizer from the `vocab.json` and `merges.txt` that SD1.x repositories ship: the embedded
/// pipeline (normalizer, pre-tokenizer, post-processor) with the folder's vocabulary.
fn from_vocab_and_merges(dir: &Path) -> Result<Tokenizer> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))
    };
    let vocab: serde_json::Value =
        serde_json::from_str(&read("vocab.json")?).map_err(|e| tokenizer_error("vocab.json", e))?;
    let merges: Vec<String> = read("merges.txt")?
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let mut template: serde_json::Value =
        serde_json::from_str(DEFAULT_TOKENIZER).map_err(|e| tokenizer_error("template", e))?;
    template["model"]["vocab"] = vocab;
    template["model"]["merges"] = serde_json::Value::from(merges);
    Tokenizer::from_str(&template.to_string())
        .map_err(|e| tokenizer_error(&dir.display().to_string(), e))
}

/// The pad token named in `tokenizer_config.json` or `special_tokens_map.json`, if any.
fn configured_pad(dir: &Path) -> Result<Option<PadToken>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::config(&path, e))?;
        let pad = match &config["pad_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => {
                o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
            }
            _ => None,
        };
        if let Some(pad) = pad {
            return Ok(Some(if pad == "<|endoftext|>" {
                PadToken::EndOfText
            } else {
                PadToken::Special(pad)
            }));
        }
    }
    Ok(None)
}
