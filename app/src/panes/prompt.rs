//! The prompt pane: prompt and negative prompt, a live token count that shows where the 75-token
//! chunks break, Ctrl+Enter to generate, and Ctrl+↑/↓ to raise or lower the emphasis of the selected
//! words in A1111's `(words:1.2)` syntax.

use std::ops::Range;

use egui::text::{CCursor, CCursorRange};
use egui::{Key, Modifiers, RichText, TextEdit};
use studio_engine::prompt::{CHUNK_TOKENS, tokenize};
use studio_engine::tokenizer::ClipTokenizer;

use super::Action;
use crate::state::Settings;

/// Weight step of one Ctrl+↑/↓ press.
const EMPHASIS_STEP: f32 = 0.1;

pub fn show(
    ui: &mut egui::Ui,
    settings: &mut Settings,
    tokenizer: Option<&ClipTokenizer>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    ui.label(RichText::new("Prompt").strong());
    prompt_field(
        ui,
        "prompt",
        &mut settings.prompt,
        "Describe the image…",
        4,
        &mut actions,
    );
    token_count(ui, &settings.prompt, tokenizer);
    ui.add_space(4.0);
    ui.label(RichText::new("Negative prompt").strong());
    prompt_field(
        ui,
        "negative prompt",
        &mut settings.negative_prompt,
        "What to avoid…",
        2,
        &mut actions,
    );
    token_count(ui, &settings.negative_prompt, tokenizer);
    actions
}

fn prompt_field(
    ui: &mut egui::Ui,
    name: &str,
    text: &mut String,
    hint: &str,
    rows: usize,
    actions: &mut Vec<Action>,
) {
    let id = ui.make_persistent_id(name);
    let focused = ui.memory(|m| m.has_focus(id));
    // Taken before the text edit sees them: it would move the cursor on Ctrl+↑/↓.
    let (ctrl_enter, up, down) = if focused {
        ui.input_mut(|i| {
            (
                i.consume_key(Modifiers::COMMAND, Key::Enter),
                i.consume_key(Modifiers::COMMAND, Key::ArrowUp),
                i.consume_key(Modifiers::COMMAND, Key::ArrowDown),
            )
        })
    } else {
        (false, false, false)
    };
    if ctrl_enter {
        actions.push(Action::Generate);
    }
    let delta = if up {
        EMPHASIS_STEP
    } else if down {
        -EMPHASIS_STEP
    } else {
        0.0
    };
    if delta != 0.0
        && let Some(mut state) = egui::text_edit::TextEditState::load(ui.ctx(), id)
    {
        let selection = state
            .cursor
            .char_range()
            .map(|r| {
                let (a, b) = (r.primary.index.0, r.secondary.index.0);
                a.min(b)..a.max(b)
            })
            .unwrap_or(0..0);
        if let Some((edited, selected)) = adjust_emphasis(text, selection, delta) {
            *text = edited;
            state.cursor.set_char_range(Some(CCursorRange::two(
                CCursor::new(selected.start),
                CCursor::new(selected.end),
            )));
            state.store(ui.ctx(), id);
        }
    }
    let output = TextEdit::multiline(text)
        .id(id)
        .hint_text(hint)
        .desired_rows(rows)
        .desired_width(f32::INFINITY)
        .show(ui);
    let response = output.response.response.clone();
    if name == "prompt"
        && ui.ctx().memory(|m| m.focused().is_none())
        && ui.ctx().cumulative_pass_nr() < 2
    {
        response.request_focus();
    }
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::MultilineTextInput, true, name));
}

fn token_count(ui: &mut egui::Ui, text: &str, tokenizer: Option<&ClipTokenizer>) {
    let Some(tokenizer) = tokenizer else {
        ui.weak("counting tokens…");
        return;
    };
    match tokenize(tokenizer, text) {
        Ok(tokens) => {
            let chunks = tokens.chunks.len();
            let label = if chunks > 1 {
                format!(
                    "{} tokens · {chunks} chunks of {CHUNK_TOKENS}",
                    tokens.token_count
                )
            } else {
                format!("{}/{CHUNK_TOKENS} tokens", tokens.token_count)
            };
            ui.weak(label).on_hover_text(
                "Prompts past 75 tokens are encoded in 75-token chunks (cut at a recent comma) and joined.",
            );
        }
        Err(error) => {
            ui.colored_label(ui.visuals().error_fg_color, error.to_string());
        }
    }
}

/// Changes the emphasis of the words selected in `text` by `delta`, as A1111's Ctrl+↑/↓:
/// `words` becomes `(words:1.1)`, `(words:1.1)` becomes `(words:1.2)`, and reaching 1.0 removes the
/// brackets. With nothing selected, the word at the cursor is used. Positions are in characters;
/// returns the new text and the selection around the words.
pub fn adjust_emphasis(
    text: &str,
    selection: Range<usize>,
    delta: f32,
) -> Option<(String, Range<usize>)> {
    let chars: Vec<char> = text.chars().collect();
    let mut range = selection.start.min(chars.len())..selection.end.min(chars.len());
    if range.is_empty() {
        range = word_at(&chars, range.start)?;
    }
    // A selection of the whole `(words:1.1)` works on the words inside.
    if chars.get(range.start) == Some(&'(') && chars.get(range.end - 1) == Some(&')') {
        let inner: String = chars[range.clone()].iter().collect();
        if let Some(colon) = inner.rfind(':') {
            let words = inner[1..colon].chars().count();
            range = range.start + 1..range.start + 1 + words;
        }
    }
    let before: String = chars[..range.start].iter().collect();
    let words: String = chars[range.clone()].iter().collect();
    let after: String = chars[range.end..].iter().collect();
    let (weight, open, close) = match (before.strip_suffix('('), parse_weight_suffix(&after)) {
        (Some(prefix), Some((weight, rest))) => (weight, prefix.to_owned(), rest.to_owned()),
        _ => (1.0, before.clone(), after.clone()),
    };
    let weight = ((weight + delta) * 100.0).round() / 100.0;
    let start = open.chars().count();
    if (weight - 1.0).abs() < 1e-6 {
        let edited = format!("{open}{words}{close}");
        return Some((edited, start..start + words.chars().count()));
    }
    let edited = format!("{open}({words}:{}){close}", format_weight(weight));
    Some((edited, start + 1..start + 1 + words.chars().count()))
}

/// `:1.2)rest` → (1.2, "rest").
fn parse_weight_suffix(after: &str) -> Option<(f32, &str)> {
    let rest = after.strip_prefix(':')?;
    let end = rest.find(')')?;
    let weight = rest[..end].trim().parse::<f32>().ok()?;
    Some((weight, &rest[end + 1..]))
}

fn format_weight(weight: f32) -> String {
    let text = format!("{weight:.2}");
    let text = text.trim_end_matches('0');
    if text.ends_with('.') {
        format!("{text}0")
    } else {
        text.to_owned()
    }
}

/// The word (letters, digits, `_`, `-`, `'`) around character `at`.
fn word_at(chars: &[char], at: usize) -> Option<Range<usize>> {
    let is_word = |c: &char| c.is_alphanumeric() || matches!(c, '_' | '-' | '\'');
    let mut start = at.min(chars.len());
    while start > 0 && is_word(&chars[start - 1]) {
        start -= 1;
    }
    let mut end = at.min(chars.len());
    while end < chars.len() && is_word(&chars[end]) {
        end += 1;
    }
    (start < end).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(text: &str, selection: Range<usize>, delta: f32) -> (String, String) {
        let (edited, range) = adjust_emphasis(text, selection, delta).unwrap();
        let selected: String = edited.chars().skip(range.start).take(range.len()).collect();
        (edited, selected)
    }

    #[test]
    fn raising_and_lowering_as_a1111_does() {
        assert_eq!(
            edit("a red fox", 2..5, 0.1),
            ("a (red:1.1) fox".into(), "red".into())
        );
        assert_eq!(
            edit("a (red:1.1) fox", 3..6, 0.1),
            ("a (red:1.2) fox".into(), "red".into())
        );
        assert_eq!(
            edit("a (red:1.1) fox", 3..6, -0.1),
            ("a red fox".into(), "red".into())
        );
        assert_eq!(
            edit("a red fox", 2..5, -0.1),
            ("a (red:0.9) fox".into(), "red".into())
        );
        assert_eq!(
            edit("a (red fur:1.25) fox", 2..16, 0.1),
            ("a (red fur:1.35) fox".into(), "red fur".into())
        );
    }

    #[test]
    fn no_selection_takes_the_word_at_the_cursor() {
        assert_eq!(
            edit("a red fox", 7..7, 0.1),
            ("a red (fox:1.1)".into(), "fox".into())
        );
        assert!(adjust_emphasis("a  b", 2..2, 0.1).is_none());
        assert_eq!(
            edit("café au lait", 2..2, 0.1),
            ("(café:1.1) au lait".into(), "café".into())
        );
    }
}
