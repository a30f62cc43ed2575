//! Cutting runs of other scripts out of a line the script rule keeps.
//!
//! A run reaches from a foreign letter to the last foreign letter before the next expected
//! one, and takes along the marks and punctuation specific to its scripts (`。`, `「`, Arabic
//! harakat and tatweel), found through their Unicode script extensions. A lone Greek letter
//! (`β-caroteen`, `Δ`) or a lone letter inside a word (a look-alike `А` in `Аmsterdam`) stays.

use unicode_script::{Script, UnicodeScript};

use crate::outcome::Change;

/// How one character votes: a letter of an expected script, of another one, or neither.
/// The script rule (`script_filter`) casts the votes; this module cuts by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vote {
    Expected,
    Foreign(Script),
    Neutral,
}

/// True when the lone foreign letter at `position` is a Greek letter used as a symbol, or
/// sits inside a word (`β-glucanen`, a Cyrillic `А` in `Аmsterdam`): it stays.
fn is_symbol_or_look_alike(
    characters: &[(usize, char, Vote)],
    position: usize,
    script: Script,
) -> bool {
    if script == Script::Greek {
        return true;
    }
    let joined = |neighbour: Option<&(usize, char, Vote)>| {
        neighbour.is_some_and(|&(_, character, _)| character.is_alphanumeric() || character == '-')
    };
    let before = position
        .checked_sub(1)
        .and_then(|index| characters.get(index));
    joined(before) || joined(characters.get(position + 1))
}

/// `line` without its runs of foreign letters. A run reaches from a foreign letter to the
/// last foreign letter before the next expected one, and takes along the marks and
/// punctuation specific to its scripts (`。`, `「`, Arabic harakat and tatweel). A lone
/// Greek letter (`β-caroteen`, `Δ`) or a lone letter inside a word (a look-alike `А` in
/// `Аmsterdam`) stays.
pub(crate) fn cut_fragments(
    line: &str,
    characters: &[(usize, char, Vote)],
    line_number: usize,
    changes: &mut Vec<Change>,
) -> String {
    let mut kept = String::with_capacity(line.len());
    let mut copied_up_to = 0usize;
    let mut position = 0usize;
    while position < characters.len() {
        let Vote::Foreign(script) = characters[position].2 else {
            position += 1;
            continue;
        };
        let mut scripts = vec![script];
        let mut letters = 1usize;
        let mut last = position;
        let mut scan = position + 1;
        while scan < characters.len() && characters[scan].2 != Vote::Expected {
            match characters[scan].2 {
                Vote::Foreign(other) => {
                    letters += 1;
                    last = scan;
                    if !scripts.contains(&other) {
                        scripts.push(other);
                    }
                }
                _ if belongs_to_scripts(characters[scan].1, &scripts, true) => last = scan,
                _ => {}
            }
            scan += 1;
        }
        if letters < 2 && is_symbol_or_look_alike(characters, position, script) {
            position = scan;
            continue;
        }
        let mut first = position;
        while first > 0
            && characters[first - 1].0 >= copied_up_to
            && belongs_to_scripts(characters[first - 1].1, &scripts, false)
        {
            first -= 1;
        }
        let start = characters[first].0;
        let end = characters.get(last + 1).map_or(line.len(), |next| next.0);
        kept.push_str(&line[copied_up_to..start]);
        changes.push(Change::ScriptRemovedFragment {
            line: line_number,
            script: script.full_name().to_string(),
            removed: line[start..end].to_string(),
        });
        copied_up_to = end;
        position = last + 1;
    }
    kept.push_str(&line[copied_up_to..]);
    kept
}

/// True for a neutral character used only with some scripts (its Unicode script extension)
/// when one of them is in `scripts`, such as `。` with Han or `،` with Arabic; combining marks
/// count too when `marks` is set.
fn belongs_to_scripts(character: char, scripts: &[Script], marks: bool) -> bool {
    if character.is_ascii() || character.is_whitespace() {
        return false;
    }
    let extension = character.script_extension();
    if extension.is_common() {
        return false;
    }
    if extension.is_inherited() {
        return marks;
    }
    scripts
        .iter()
        .any(|script| extension.contains_script(*script))
}
