//! A local model's outputs as item updates: the values to write (embedding as JSON text or
//! float32 bytes, label and probability), and what happens to items the model failed on.
//! Pure.

use backfill_onnx::{Output, embedding_to_f32le, embedding_to_json};

use crate::job::TargetFormat;
use crate::ledger::OutputStatus;
use crate::store::{Claimed, ItemChange, ItemUpdate, OutputRecord, OutputValue};

/// How outputs go into the target: the table's output keys and the embedding format.
#[derive(Debug, Clone)]
pub struct OutputLayout {
    /// The target's output keys (`""` for one column; `label`/`probability` for a
    /// classification's `target.columns`).
    pub keys: Vec<String>,
    pub format: TargetFormat,
}

impl OutputLayout {
    /// The `(key, value)` pairs to write for one output.
    pub fn values(&self, output: &Output) -> Vec<(String, OutputValue)> {
        match output {
            Output::Embedding(vector) => {
                let value = match self.format {
                    TargetFormat::F32Le => OutputValue::Blob(embedding_to_f32le(vector)),
                    TargetFormat::JsonArray | TargetFormat::Text => OutputValue::Text(embedding_to_json(vector)),
                };
                self.keys.iter().map(|key| (key.clone(), value.clone())).collect()
            }
            Output::Classification { label, probability } => self
                .keys
                .iter()
                .map(|key| {
                    let value = match key.as_str() {
                        "probability" => OutputValue::Real(f64::from(*probability)),
                        _ => OutputValue::Text(label.clone()),
                    };
                    (key.clone(), value)
                })
                .collect(),
        }
    }

    /// The item's update: done with its values. A classification keeps its answer in the audit
    /// table; an embedding is only in the target (it would double the database's size).
    pub fn done(&self, claimed: &Claimed, output: &Output) -> ItemUpdate {
        let record = match output {
            Output::Classification { label, probability } => {
                let raw = serde_json::json!({ "label": label, "probability": probability }).to_string();
                Some(OutputRecord { status: OutputStatus::Written.as_str().into(), raw: Some(raw.clone()), final_json: Some(raw), detail: None })
            }
            Output::Embedding(_) => None,
        };
        ItemUpdate { lease: claimed.lease.clone(), change: ItemChange::Done { values: self.values(output) }, output: record }
    }
}

/// An item the model failed on by itself: the model is deterministic, so trying again would
/// fail again. It fails at once with the model's message.
pub fn model_failed(claimed: &Claimed, error: &str) -> ItemUpdate {
    ItemUpdate {
        lease: claimed.lease.clone(),
        change: ItemChange::Failed { attempts: claimed.attempts + 1, error: error.to_owned(), reason: "model_error".into() },
        output: Some(OutputRecord { status: OutputStatus::Invalid.as_str().into(), raw: None, final_json: None, detail: Some(error.to_owned()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Item;
    use crate::store::Lease;

    fn layout(keys: &[&str], format: TargetFormat) -> OutputLayout {
        OutputLayout { keys: keys.iter().map(|k| k.to_string()).collect(), format }
    }

    #[test]
    fn embeddings_are_json_text_or_little_endian_float32() {
        let output = Output::Embedding(vec![0.5, -1.0]);
        assert_eq!(layout(&[""], TargetFormat::JsonArray).values(&output), vec![("".into(), OutputValue::Text("[0.5,-1]".into()))]);
        let bytes: Vec<u8> = [0.5f32, -1.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(layout(&[""], TargetFormat::F32Le).values(&output), vec![("".into(), OutputValue::Blob(bytes))]);
    }

    #[test]
    fn a_classification_writes_its_label_and_probability_where_mapped() {
        let output = Output::Classification { label: "rechts".into(), probability: 0.75 };
        assert_eq!(layout(&[""], TargetFormat::Text).values(&output), vec![("".into(), OutputValue::Text("rechts".into()))]);
        assert_eq!(
            layout(&["label", "probability"], TargetFormat::Text).values(&output),
            vec![("label".into(), OutputValue::Text("rechts".into())), ("probability".into(), OutputValue::Real(0.75))]
        );
    }

    #[test]
    fn an_item_the_model_fails_on_fails_for_good() {
        let claimed = Claimed { lease: Lease { item_id: "3".into(), token: 9 }, attempts: 0, tier: 0, item: Item { id: "3".into(), fields: vec![] } };
        let update = model_failed(&claimed, "non-finite");
        assert!(matches!(update.change, ItemChange::Failed { attempts: 1, ref reason, .. } if reason == "model_error"));
    }
}
