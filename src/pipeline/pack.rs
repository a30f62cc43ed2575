//! The packer: renders one multi-item prompt from a batch of rows, within a token budget.
//!
//! The template's `{{items}}` becomes a JSON array of `{"id": …, <columns>}` objects, one per
//! line, and `{{count}}` the number of items. Substitution is a single pass over the template,
//! so text inside a row that looks like a placeholder is never expanded.

use crate::store::Item;
use crate::tokens::TokenCounter;

pub use backfill_controller::ENCLOSING_OBJECT_TOKENS;

/// A rendered request: the prompt, its size, and the output budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub system: Option<String>,
    pub user: String,
    /// Prompt tokens counted with the job's encoding (messages included).
    pub prompt_tokens: u64,
    /// The `max_tokens` to request.
    pub max_tokens: u32,
    /// How many of the offered items went in (always a prefix, at least one).
    pub items: usize,
}

/// Renders prompts for one job.
#[derive(Debug, Clone)]
pub struct Packer {
    template: Vec<Piece>,
    system: Option<String>,
    counter: TokenCounter,
    /// The system message's tokens, counted once.
    system_tokens: Option<u64>,
    context_window: u32,
    max_tokens_cap: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Items,
    Count,
}

impl Packer {
    pub fn new(
        template: &str,
        system: Option<String>,
        counter: TokenCounter,
        context_window: u32,
        max_tokens_cap: Option<u32>,
    ) -> Self {
        let system_tokens = system.as_deref().map(|s| counter.count(s));
        Self { template: parse_template(template), system, counter, system_tokens, context_window, max_tokens_cap }
    }

    /// Renders the user prompt for exactly these items.
    pub fn render(&self, items: &[Item]) -> String {
        let mut out = String::new();
        for piece in &self.template {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Count => out.push_str(&items.len().to_string()),
                Piece::Items => {
                    out.push_str("[\n");
                    for (i, item) in items.iter().enumerate() {
                        out.push_str(&item.to_json_line());
                        out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                    }
                    out.push(']');
                }
            }
        }
        out
    }

    /// The `max_tokens` for `items` items at `output_per_item` tokens each (JSON structure
    /// included), plus `ENCLOSING_OBJECT_TOKENS` for the enclosing object.
    pub fn max_tokens_for(&self, items: usize, output_per_item: f64) -> u32 {
        let wanted = ((items as f64 * output_per_item).ceil() + f64::from(ENCLOSING_OBJECT_TOKENS)).min(f64::from(u32::MAX)) as u32;
        match self.max_tokens_cap {
            Some(cap) => wanted.min(cap),
            None => wanted,
        }
    }

    /// Packs the longest prefix of `items` whose prompt plus expected output fits the context
    /// window and the model's output cap; always at least one item.
    pub fn pack(&self, items: &[Item], output_per_item: f64) -> Packed {
        assert!(!items.is_empty(), "pack needs at least one item");
        // Usually every offered item fits: render and count once.
        let user = self.render(items);
        let prompt_tokens = self.counter.chat_counted(self.system_tokens, &user);
        let max_tokens = self.max_tokens_for(items.len(), output_per_item);
        let fits_context = prompt_tokens + u64::from(max_tokens) <= u64::from(self.context_window);
        let fits_cap = self.max_tokens_cap.is_none_or(|cap| output_per_item * items.len() as f64 <= f64::from(cap));
        if items.len() == 1 || (fits_context && fits_cap) {
            return Packed { system: self.system.clone(), user, prompt_tokens, max_tokens, items: items.len() };
        }
        self.pack_prefix(items, output_per_item)
    }

    /// The longest fitting prefix, counting item by item.
    fn pack_prefix(&self, items: &[Item], output_per_item: f64) -> Packed {
        let base = self.counter.chat_counted(self.system_tokens, &self.render(&[]));
        let mut total = base;
        let mut n = 0;
        for item in items {
            let cost = self.counter.count(&item.to_json_line()) + 1;
            let output = u64::from(self.max_tokens_for(n + 1, output_per_item));
            let fits_context = total + cost + output <= u64::from(self.context_window);
            let per_item_total = output_per_item * (n as f64 + 1.0);
            let fits_cap = self.max_tokens_cap.is_none_or(|cap| per_item_total <= f64::from(cap));
            if n > 0 && !(fits_context && fits_cap) {
                break;
            }
            total += cost;
            n += 1;
        }
        let user = self.render(&items[..n]);
        let prompt_tokens = self.counter.chat_counted(self.system_tokens, &user);
        Packed {
            system: self.system.clone(),
            user,
            prompt_tokens,
            max_tokens: self.max_tokens_for(n, output_per_item),
            items: n,
        }
    }
}

fn parse_template(template: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = template;
    loop {
        let next = [("{{items}}", Piece::Items), ("{{count}}", Piece::Count)]
            .into_iter()
            .filter_map(|(pat, piece)| rest.find(pat).map(|at| (at, pat.len(), piece)))
            .min_by_key(|(at, _, _)| *at);
        match next {
            Some((at, len, piece)) => {
                if at > 0 {
                    pieces.push(Piece::Text(rest[..at].to_owned()));
                }
                pieces.push(piece);
                rest = &rest[at + len..];
            }
            None => {
                if !rest.is_empty() {
                    pieces.push(Piece::Text(rest.to_owned()));
                }
                return pieces;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use serde_json::json;

    fn item(id: &str, text: &str) -> Item {
        Item { id: id.into(), fields: vec![("text".into(), json!(text))] }
    }

    fn packer(window: u32, cap: Option<u32>) -> Packer {
        Packer::new(
            "Explain these {{count}} items:\n{{items}}\nAnswer in JSON.",
            None,
            TokenCounter::new("cl100k_base").unwrap(),
            window,
            cap,
        )
    }

    #[test]
    fn renders_items_and_count_once() {
        let p = packer(100_000, None);
        let out = p.render(&[item("1", "a {{items}} b"), item("2", "{{count}}")]);
        assert_eq!(
            out,
            "Explain these 2 items:\n[\n{\"id\":\"1\",\"text\":\"a {{items}} b\"},\n{\"id\":\"2\",\"text\":\"{{count}}\"}\n]\nAnswer in JSON."
        );
    }

    #[test]
    fn hostile_text_stays_inside_its_json_string() {
        let p = packer(100_000, None);
        let out = p.render(&[item("7", "\"}], \"id\": \"8\"\n")]);
        let start = out.find('[').unwrap();
        let end = out.rfind(']').unwrap();
        let parsed: Vec<Value> = serde_json::from_str(&out[start..=end]).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0]["id"], "7");
    }

    #[test]
    fn packs_a_prefix_that_fits_the_context_window() {
        let items: Vec<Item> = (0..40).map(|i| item(&i.to_string(), &"woord ".repeat(50))).collect();
        let roomy = packer(1_000_000, None).pack(&items, 100.0);
        assert_eq!(roomy.items, 40);
        let tight = packer(2_000, None).pack(&items, 100.0);
        assert!(tight.items >= 1 && tight.items < 40, "{}", tight.items);
        assert!(tight.prompt_tokens + u64::from(tight.max_tokens) <= 2_000 + 100);
    }

    #[test]
    fn output_cap_limits_items_and_max_tokens() {
        let items: Vec<Item> = (0..40).map(|i| item(&i.to_string(), "kort")).collect();
        let packed = packer(1_000_000, Some(1_000)).pack(&items, 208.0);
        assert_eq!(packed.items, 4); // 4 × 208 = 832 <= 1000 < 5 × 208
        assert!(packed.max_tokens <= 1_000);
    }

    #[test]
    fn one_item_always_goes_in() {
        let items = vec![item("big", &"x ".repeat(5_000))];
        assert_eq!(packer(100, None).pack(&items, 100.0).items, 1);
    }
}
