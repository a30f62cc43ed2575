//! Request bodies for `/chat/completions`, including a schema that forces exactly the batch's
//! ids as keys.

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::job::{MaxTokensField, StructuredOutput};
use crate::pipeline::answers::OutputShape;

/// A chat request, serialised in a fixed field order so its hash is stable.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub temperature: Option<f64>,
    /// The most tokens the answer may take, sent as `max_tokens_field` names.
    pub max_tokens: u32,
    pub max_tokens_field: MaxTokensField,
    pub response_format: Option<Value>,
}

impl Serialize for ChatRequest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = 3 + usize::from(self.temperature.is_some()) + usize::from(self.response_format.is_some());
        let mut out = serializer.serialize_struct("ChatRequest", fields)?;
        out.serialize_field("model", &self.model)?;
        out.serialize_field("messages", &self.messages)?;
        if let Some(temperature) = self.temperature {
            out.serialize_field("temperature", &temperature)?;
        }
        out.serialize_field(self.max_tokens_field.name(), &self.max_tokens)?;
        if let Some(format) = &self.response_format {
            out.serialize_field("response_format", format)?;
        }
        out.end()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

impl ChatRequest {
    pub fn new(
        model: &str,
        system: Option<&str>,
        user: String,
        temperature: Option<f64>,
        max_tokens: u32,
        response_format: Option<Value>,
    ) -> Self {
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(Message { role: "system", content: system.to_owned() });
        }
        messages.push(Message { role: "user", content: user });
        Self { model: model.to_owned(), messages, temperature, max_tokens, max_tokens_field: MaxTokensField::MaxTokens, response_format }
    }

    /// The same request with its token cap sent as `field`.
    pub fn with_max_tokens_field(self, field: MaxTokensField) -> Self {
        Self { max_tokens_field: field, ..self }
    }
}

/// The serialised body and its cache key: sha256 over the model, the messages and the
/// parameters that shape the answer. `max_tokens` is left out: only answers that came back
/// whole are kept in the cache, and a whole answer does not depend on how much room it had.
pub fn request_body(request: &ChatRequest) -> (Vec<u8>, String) {
    let body = serde_json::to_vec(request).expect("request serialises");
    let key = CacheKey {
        model: &request.model,
        messages: &request.messages,
        temperature: request.temperature,
        response_format: request.response_format.as_ref(),
    };
    let hash = hex::encode(Sha256::digest(serde_json::to_vec(&key).expect("key serialises")));
    (body, hash)
}

/// What identifies an answer, in a fixed field order so its hash is stable.
#[derive(Serialize)]
struct CacheKey<'a> {
    model: &'a str,
    messages: &'a [Message],
    temperature: Option<f64>,
    response_format: Option<&'a Value>,
}

/// The `response_format` for a batch with these ids.
pub fn response_format(mode: StructuredOutput, ids: &[String], shape: &OutputShape) -> Option<Value> {
    match mode {
        StructuredOutput::None => None,
        StructuredOutput::JsonObject => Some(json!({ "type": "json_object" })),
        StructuredOutput::JsonObjectSchema => {
            Some(json!({ "type": "json_object", "schema": batch_schema(ids, shape) }))
        }
        StructuredOutput::JsonSchema => Some(json!({
            "type": "json_schema",
            "json_schema": { "name": "batch_outputs", "strict": true, "schema": batch_schema(ids, shape) }
        })),
    }
}

/// An object schema whose required keys are exactly `ids`.
fn batch_schema(ids: &[String], shape: &OutputShape) -> Value {
    let item = match shape {
        OutputShape::Text => json!({ "type": "string" }),
        OutputShape::Object(keys) => {
            let properties: serde_json::Map<String, Value> =
                keys.iter().map(|k| (k.clone(), json!({ "type": "string" }))).collect();
            json!({
                "type": "object",
                "properties": properties,
                "required": keys,
                "additionalProperties": false
            })
        }
    };
    let properties: serde_json::Map<String, Value> = ids.iter().map(|id| (id.clone(), item.clone())).collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": ids,
        "additionalProperties": false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_requires_exactly_the_batch_ids() {
        let ids = vec!["7".to_string(), "2024Z01".to_string()];
        let format = response_format(StructuredOutput::JsonSchema, &ids, &OutputShape::Text).unwrap();
        let schema = &format["json_schema"]["schema"];
        assert_eq!(schema["required"], json!(["7", "2024Z01"]));
        assert_eq!(schema["additionalProperties"], json!(false));
        assert_eq!(format["json_schema"]["strict"], json!(true));
        let llama = response_format(StructuredOutput::JsonObjectSchema, &ids, &OutputShape::Text).unwrap();
        assert_eq!(llama["type"], "json_object");
        assert_eq!(llama["schema"]["properties"]["7"]["type"], "string");
    }

    #[test]
    fn hash_changes_with_model_prompt_and_parameters_but_not_max_tokens() {
        let a = ChatRequest::new("m", None, "hi".into(), Some(0.2), 100, None);
        let mut b = a.clone();
        assert_eq!(request_body(&a).1, request_body(&b).1);
        b.max_tokens = 101;
        assert_eq!(request_body(&a).1, request_body(&b).1, "room for the answer does not change it");
        assert_ne!(request_body(&a).0, request_body(&b).0);
        b.temperature = Some(0.3);
        assert_ne!(request_body(&a).1, request_body(&b).1);
        let mut c = a.clone();
        c.messages[0].content.push('!');
        assert_ne!(request_body(&a).1, request_body(&c).1);
        let mut d = a.clone();
        d.model = "n".into();
        assert_ne!(request_body(&a).1, request_body(&d).1);
        // The field that carries the cap: the body says it, the cache key does not.
        let e = a.clone().with_max_tokens_field(MaxTokensField::MaxCompletionTokens);
        assert_eq!(request_body(&a).1, request_body(&e).1);
        let body: Value = serde_json::from_slice(&request_body(&e).0).unwrap();
        assert_eq!((body.get("max_tokens"), body["max_completion_tokens"].as_u64()), (None, Some(100)));
        let body: Value = serde_json::from_slice(&request_body(&a).0).unwrap();
        assert_eq!((body["max_tokens"].as_u64(), body.get("max_completion_tokens")), (Some(100), None));
        let mut keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["max_tokens", "messages", "model", "temperature"]);
    }
}
