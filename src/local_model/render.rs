//! The `input` template of a local-model job: `{{column}}` placeholders replaced by the row's
//! values (the job checks the names, `job::validate`). Pure.

use serde_json::Value;

use crate::store::Item;

/// The row's text: each `{{column}}` replaced by its value (`{{id}}` by the id). Text goes in
/// as it is, NULL as nothing, numbers and booleans as written, anything else as JSON.
pub fn render(template: &str, item: &Item) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else { break };
        out.push_str(&rest[..open]);
        let name = after[..close].trim();
        if name == "id" {
            out.push_str(&item.id);
        } else if let Some((_, value)) = item.fields.iter().find(|(column, _)| column == name) {
            push_value(&mut out, value);
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

fn push_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => {}
        Value::String(text) => out.push_str(text),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item() -> Item {
        Item {
            id: "7".into(),
            fields: vec![("title".into(), json!("Motie {{x}}")), ("text".into(), Value::Null), ("year".into(), json!(2024))],
        }
    }

    #[test]
    fn placeholders_are_replaced_by_the_rows_values() {
        assert_eq!(render("{{title}}\n{{ text }}|{{year}}#{{id}}", &item()), "Motie {{x}}\n|2024#7");
    }

    #[test]
    fn values_are_not_rendered_again_and_unclosed_braces_stay() {
        assert_eq!(render("a {{title}} b {{ c", &item()), "a Motie {{x}} b {{ c");
    }
}
