//! Token ids equal transformers' `CLIPTokenizer` as diffusers calls it (padded and truncated to 77),
//! for folder tokenizers in both published forms and for the built-in vocabulary.

use serde_json::Value;
use studio_engine::tokenizer::{ClipTokenizer, PadToken};
use studio_tests::{fixtures, model};

fn cases(family: &str) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(fixtures().join("reference/tokens.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    all[family]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let ids = |key: &str| -> Vec<u32> {
                case[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            };
            (
                case["prompt"].as_str().unwrap().to_owned(),
                ids("padded"),
                ids("untruncated"),
            )
        })
        .collect()
}

fn check(tokenizer: &ClipTokenizer, family: &str) {
    let cases = cases(family);
    assert!(
        cases.iter().any(|(_, _, raw)| raw.len() > 77),
        "a prompt over 77 tokens is covered"
    );
    assert!(
        cases.iter().any(|(p, _, _)| p.is_empty()),
        "the empty prompt is covered"
    );
    for (prompt, padded, raw) in cases {
        assert_eq!(
            tokenizer.encode(&prompt).unwrap(),
            raw,
            "{family}: {prompt:?}"
        );
        assert_eq!(
            tokenizer.encode_padded(&prompt).unwrap(),
            padded,
            "{family} padded: {prompt:?}"
        );
    }
}

#[test]
fn sd1_folder_with_vocab_and_merges() {
    let dir = model("sd1/tokenizer");
    assert!(
        !dir.join("tokenizer.json").exists(),
        "this fixture is the vocab.json + merges.txt form"
    );
    check(
        &ClipTokenizer::from_folder(&dir, &PadToken::EndOfText).unwrap(),
        "sd1",
    );
}

#[test]
fn sd2_folder_with_tokenizer_json_pads_with_exclamation_mark() {
    let tokenizer =
        ClipTokenizer::from_folder(&model("sd2/tokenizer"), &PadToken::EndOfText).unwrap();
    assert_eq!(tokenizer.pad_id(), 0);
    check(&tokenizer, "sd2");
}

#[test]
fn builtin_vocabulary_matches_both_families() {
    check(
        &ClipTokenizer::builtin(&PadToken::EndOfText).unwrap(),
        "sd1",
    );
    check(
        &ClipTokenizer::builtin(&PadToken::Special("!".into())).unwrap(),
        "sd2",
    );
}

#[test]
fn very_long_prompt_is_truncated_not_refused() {
    let tokenizer = ClipTokenizer::builtin(&PadToken::EndOfText).unwrap();
    let prompt = "a castle on a hill ".repeat(600);
    assert!(prompt.len() >= 10_000);
    let padded = tokenizer.encode_padded(&prompt).unwrap();
    assert_eq!(padded.len(), 77);
    assert_eq!((padded[0], padded[76]), (49406, 49407));
}
