//! The requests a run would make, rendered with the real packer and counted with the real
//! tokenizer. Pure and CPU-bound: the pending rows are split into chunks on request boundaries
//! and counted on several threads.

use crate::pipeline::pack::Packer;
use crate::store::Item;
use crate::tokens::TokenCounter;

/// What the requests add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Planned {
    pub requests: u64,
    pub items: u64,
    /// Prompt tokens of every rendered request, chat framing included.
    pub prompt_tokens: u64,
    /// Output tokens of the answers' JSON structure alone (`{"id":"",…}`), without the texts.
    pub skeleton_tokens: u64,
}

impl std::ops::AddAssign for Planned {
    fn add_assign(&mut self, other: Planned) {
        self.requests += other.requests;
        self.items += other.items;
        self.prompt_tokens += other.prompt_tokens;
        self.skeleton_tokens += other.skeleton_tokens;
    }
}

/// How each item's answer is shaped: one string, or an object with these keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerShape {
    Text,
    Object(Vec<String>),
}

/// Packs `rows` in order into requests of at most `items_per_request` items (fewer when the
/// context window or the output cap says so), as the runner's packer does.
pub fn plan(
    packer: &Packer,
    counter: TokenCounter,
    shape: &AnswerShape,
    rows: &[Item],
    items_per_request: usize,
    output_per_item: f64,
    threads: usize,
) -> Planned {
    let per_request = items_per_request.max(1);
    let threads = threads.max(1);
    // Whole requests per chunk, so chunking changes nothing while every request fits.
    let requests = rows.len().div_ceil(per_request);
    let chunk = requests.div_ceil(threads).max(1) * per_request;
    if threads == 1 || rows.len() <= chunk {
        return plan_chunk(packer, counter, shape, rows, per_request, output_per_item);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .chunks(chunk)
            .map(|part| scope.spawn(move || plan_chunk(packer, counter, shape, part, per_request, output_per_item)))
            .collect();
        let mut total = Planned::default();
        for handle in handles {
            total += handle.join().expect("a counting thread panicked");
        }
        total
    })
}

fn plan_chunk(
    packer: &Packer,
    counter: TokenCounter,
    shape: &AnswerShape,
    rows: &[Item],
    per_request: usize,
    output_per_item: f64,
) -> Planned {
    let mut planned = Planned::default();
    let mut at = 0;
    while at < rows.len() {
        let end = (at + per_request).min(rows.len());
        let packed = packer.pack(&rows[at..end], output_per_item);
        planned.requests += 1;
        planned.items += packed.items as u64;
        planned.prompt_tokens += packed.prompt_tokens;
        planned.skeleton_tokens += counter.count(&skeleton(shape, &rows[at..at + packed.items]));
        at += packed.items;
    }
    planned
}

/// The answer with empty texts: `{"1":"","2":""}` or `{"1":{"a":"","b":""}}`.
fn skeleton(shape: &AnswerShape, items: &[Item]) -> String {
    let value = match shape {
        AnswerShape::Text => {
            serde_json::Value::Object(items.iter().map(|i| (i.id.clone(), serde_json::Value::String(String::new()))).collect())
        }
        AnswerShape::Object(keys) => {
            let inner: serde_json::Map<_, _> =
                keys.iter().map(|k| (k.clone(), serde_json::Value::String(String::new()))).collect();
            serde_json::Value::Object(items.iter().map(|i| (i.id.clone(), serde_json::Value::Object(inner.clone()))).collect())
        }
    };
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(n: usize) -> Vec<Item> {
        (0..n)
            .map(|i| Item {
                id: (1000 + i).to_string(),
                fields: vec![("text".into(), json!(format!("De Kamer verzoekt de regering om punt {i} te regelen.")))],
            })
            .collect()
    }

    fn packer(window: u32) -> Packer {
        let counter = TokenCounter::new("o200k_base").unwrap();
        Packer::new("Leg deze {{count}} moties uit:\n{{items}}\nAntwoord in JSON.", Some("Je bent behulpzaam.".into()), counter, window, None)
    }

    #[test]
    fn threads_count_exactly_what_one_thread_counts() {
        let counter = TokenCounter::new("o200k_base").unwrap();
        let rows = rows(1003);
        let one = plan(&packer(128_000), counter, &AnswerShape::Text, &rows, 10, 100.0, 1);
        let four = plan(&packer(128_000), counter, &AnswerShape::Text, &rows, 10, 100.0, 4);
        assert_eq!(one, four);
        assert_eq!(one.requests, 101);
        assert_eq!(one.items, 1003);
    }

    #[test]
    fn prompt_tokens_are_those_of_the_rendered_requests() {
        let counter = TokenCounter::new("o200k_base").unwrap();
        let rows = rows(25);
        let p = packer(128_000);
        let planned = plan(&p, counter, &AnswerShape::Text, &rows, 10, 100.0, 2);
        let by_hand: u64 = rows.chunks(10).map(|c| counter.chat(Some("Je bent behulpzaam."), &p.render(c))).sum();
        assert_eq!(planned.prompt_tokens, by_hand);
        assert_eq!(planned.requests, 3);
    }

    #[test]
    fn a_small_context_window_makes_more_requests() {
        let counter = TokenCounter::new("o200k_base").unwrap();
        let rows = rows(40);
        let roomy = plan(&packer(128_000), counter, &AnswerShape::Text, &rows, 20, 100.0, 1);
        let tight = plan(&packer(1_000), counter, &AnswerShape::Text, &rows, 20, 100.0, 1);
        assert_eq!(roomy.requests, 2);
        assert!(tight.requests > roomy.requests, "{tight:?}");
        assert_eq!(tight.items, 40);
    }

    #[test]
    fn the_skeleton_holds_every_id_and_key() {
        let items = rows(2);
        assert_eq!(skeleton(&AnswerShape::Text, &items), r#"{"1000":"","1001":""}"#);
        let object = skeleton(&AnswerShape::Object(vec!["summary".into(), "topic".into()]), &items[..1]);
        assert_eq!(object, r#"{"1000":{"summary":"","topic":""}}"#);
    }
}
