//! Reading a job file and checking it before anything runs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{JobFile, ModelFile, RangeFile};
use super::*;
use crate::exit::usage;
use crate::pricing::PriceTable;

/// The longest duration a job may give in seconds (timeouts, leases, polls, grace): one day.
const MAX_SECONDS: f64 = 86_400.0;
/// The longest cache lifetime: ten years.
const MAX_TTL_HOURS: f64 = 87_600.0;
/// The highest budget cap: a million USD (the ledger counts pico-dollars in 64 bits, which end
/// near 9.2 million USD).
const MAX_BUDGET_USD: f64 = 1_000_000.0;
/// Most items per request and most calls in flight.
const MAX_RANGE: u32 = 10_000;
/// The largest context window a job may name, in tokens.
const MAX_CONTEXT_WINDOW: u32 = 100_000_000;

/// The values a number in the job file may take: finite, from `min` (excluded when
/// `min_excluded`) to `max`. A value outside gives an error naming the key, the value and the
/// range, so huge values are refused before they can overflow a duration or a sum.
#[derive(Debug, Clone, Copy)]
struct Range {
    min: f64,
    min_excluded: bool,
    max: f64,
    unit: &'static str,
}

impl Range {
    /// `min <= value <= max`.
    fn between(min: f64, max: f64, unit: &'static str) -> Range {
        Range { min, min_excluded: false, max, unit }
    }

    /// `min < value <= max`.
    fn above(min: f64, max: f64, unit: &'static str) -> Range {
        Range { min, min_excluded: true, max, unit }
    }

    fn check(self, key: &str, value: f64) -> anyhow::Result<f64> {
        let low_ok = if self.min_excluded { value > self.min } else { value >= self.min };
        if value.is_finite() && low_ok && value <= self.max {
            return Ok(value);
        }
        let unit = if self.unit.is_empty() { String::new() } else { format!(" {}", self.unit) };
        let low = if self.min_excluded { format!("above {}", shown(self.min)) } else { format!("at least {}", shown(self.min)) };
        Err(usage(format!("`{key}` = {}: must be {low} and at most {}{unit}", shown(value), shown(self.max))))
    }

    /// The same check for an integer.
    fn check_int(self, key: &str, value: u64) -> anyhow::Result<u64> {
        self.check(key, value as f64).map(|_| value)
    }
}

/// A number for a message: plain when it is of a readable size, else in scientific notation.
fn shown(value: f64) -> String {
    if value != 0.0 && !(1e-4..1e12).contains(&value.abs()) { format!("{value:e}") } else { format!("{value}") }
}

/// Command-line settings that override or complete the job file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--database URL`.
    pub database: Option<String>,
    /// `--max-usd`.
    pub max_usd: Option<f64>,
    /// `--allow-unpriced`: run models without a price (their cost counts as zero unless the
    /// provider reports one).
    pub allow_unpriced: bool,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--batch-api`: run through the provider's batch API whatever `model.mode` says.
    pub batch_api: bool,
}

pub(super) fn load(path: &Path, options: &LoadOptions) -> anyhow::Result<Job> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read job file {shown}: {e}")))?;
    let mut value: toml::Value = toml::from_str::<toml::Table>(&text)
        .map(toml::Value::Table)
        .map_err(|e| usage(format!("job file {shown} is not valid TOML: {e}")))?;
    super::env::expand_toml(&mut value, "")
        .map_err(|(key, e)| usage(format!("job file {shown}: `{key}`: {e}")))?;
    let file: JobFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        usage(format!("job file {shown}: `{key}`: {}", e.inner()))
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    build(path, &dir, file, options)
}

fn build(path: &Path, dir: &Path, file: JobFile, options: &LoadOptions) -> anyhow::Result<Job> {
    let name = file.name.trim().to_owned();
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(usage(format!(
            "`name`: {:?} must be non-empty and use only ASCII letters, digits, `_`, `-` and `.`",
            file.name
        )));
    }

    let database = database_url(dir, options.database.as_deref(), file.source.database.as_deref())?;
    let source = source(&file)?;
    let processor = processor(dir, &file, options)?;
    let target = target(&file, &source, &processor)?;
    if let Processor::Onnx(model) = &processor {
        check_input_template(&model.input, &source)?;
    }
    let limits = limits(&file)?;

    let price_files: Vec<PathBuf> =
        file.prices.iter().map(|p| resolve(dir, p, "prices")).collect::<Result<_, _>>()?;
    let price_refs: Vec<&Path> = price_files.iter().map(PathBuf::as_path).collect();
    let mut prices = PriceTable::load(&price_refs, &file.pricing)?;
    let mut processor = processor;
    if let Processor::Chat(chat) = &mut processor {
        // The model's own encoding from its price entry, unless the job names one.
        if let (None, Some(encoding)) = (&file.model.encoding, prices.encoding(&chat.name)) {
            check_encoding(encoding, &format!("pricing.\"{}\".encoding", chat.name))?;
            chat.encoding = encoding.to_owned();
        }
    }
    if let Processor::Chat(chat) = &processor {
        for model in chat.tiers() {
            if prices.get(model).is_none() {
                if options.allow_unpriced {
                    prices.insert_unpriced(model);
                } else {
                    let hint = prices
                        .closest(model)
                        .map(|name| format!("did you mean `{name}`? Or "))
                        .unwrap_or_default();
                    return Err(usage(format!(
                        "no price for model `{model}`: {hint}add [pricing.\"{model}\"] with `input` and \
                         `output` (USD per million tokens), or list a price file that has it in \
                         `prices = [...]`, or pass --allow-unpriced to run it uncosted"
                    )));
                }
            }
        }
    }

    let budget_usd = options.max_usd.or(file.budget.max_usd);
    if let Some(max) = budget_usd {
        let key = if options.max_usd.is_some() { "--max-usd" } else { "budget.max_usd" };
        Range::above(0.0, MAX_BUDGET_USD, "USD").check(key, max)?;
    }
    let ttl_hours = Range::above(0.0, MAX_TTL_HOURS, "hours").check("cache.ttl_hours", file.cache.ttl_hours)?;
    let cache = CacheSettings {
        enabled: file.cache.enabled && !options.no_cache,
        ttl: Duration::from_secs_f64(ttl_hours * 3600.0),
    };

    Ok(Job {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        name,
        database,
        source,
        target,
        processor,
        prices,
        limits,
        budget_usd,
        postprocess: file.postprocess,
        cache,
    })
}

/// Resolves a path from the job file: relative paths are relative to the job file's directory,
/// so a job runs the same from any working directory (cron included).
fn resolve(dir: &Path, relative: &str, key: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(relative);
    if path.exists() {
        Ok(path)
    } else {
        Err(usage(format!(
            "`{key}`: file {} does not exist (relative paths are relative to the job file's directory); \
             fix the path or create the file",
            path.display()
        )))
    }
}

pub(crate) fn database_url(dir: &Path, cli: Option<&str>, job: Option<&str>) -> anyhow::Result<DatabaseUrl> {
    let (raw, key) = match (cli, job) {
        (Some(url), _) => (url, "--database"),
        (None, Some(url)) => (url, "source.database"),
        (None, None) => {
            return Err(usage(
                "`source.database` is missing: set it in the job (sqlite://path.db or \
                 postgres://…) or pass --database URL",
            ));
        }
    };
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        return Ok(DatabaseUrl::new(raw));
    }
    let Some(rest) = raw.strip_prefix("sqlite://").or_else(|| raw.strip_prefix("sqlite:")) else {
        return Err(usage(format!(
            "`{key}`: {} is not a supported database URL; use sqlite://path.db or postgres://user@host/db",
            DatabaseUrl::new(raw)
        )));
    };
    let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
    if file.is_empty() || file == ":memory:" {
        return Err(usage(format!("`{key}`: give the SQLite database a file path (sqlite://path.db)")));
    }
    let resolved = if key == "--database" && !Path::new(file).is_absolute() {
        // A path typed on the command line is relative to where it was typed.
        let p = PathBuf::from(file);
        if !p.exists() {
            return Err(usage(format!("`--database`: SQLite file {file} does not exist")));
        }
        p
    } else {
        resolve(dir, file, key)?
    };
    let absolute = std::path::absolute(&resolved).unwrap_or(resolved);
    let query = if query.is_empty() { String::new() } else { format!("?{query}") };
    Ok(DatabaseUrl::new(format!("sqlite://{}{query}", absolute.display())))
}

fn ident_error(key: &str, e: crate::ident::IdentError) -> anyhow::Error {
    usage(format!("`{key}`: {e}; write the name exactly as the database has it"))
}

fn source(file: &JobFile) -> anyhow::Result<Source> {
    let s = &file.source;
    let table = Ident::table(&s.table).map_err(|e| ident_error("source.table", e))?;
    let id = Ident::column(&s.id).map_err(|e| ident_error("source.id", e))?;
    if s.columns.is_empty() {
        return Err(usage("`source.columns` is empty: list the columns the model should see"));
    }
    let mut seen = BTreeSet::new();
    let mut columns = Vec::new();
    for (i, name) in s.columns.iter().enumerate() {
        let key = format!("source.columns[{i}]");
        let column = Ident::column(name).map_err(|e| ident_error(&key, e))?;
        if name == "id" || column == id {
            return Err(usage(format!(
                "`{key}`: `{name}` clashes with the item's `id` field; the id is always sent, leave it out"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(usage(format!("`{key}`: `{name}` is listed twice")));
        }
        columns.push(column);
    }
    if s.pending.trim().is_empty() {
        return Err(usage(
            "`source.pending` is empty: give the SQL condition of rows still to do, e.g. \"summary IS NULL\"",
        ));
    }
    Ok(Source { table, id, columns, pending: s.pending.clone() })
}

fn target(file: &JobFile, source: &Source, processor: &Processor) -> anyhow::Result<Target> {
    let t = &file.target;
    let outputs: Vec<(Option<String>, Ident)> = match (&t.column, &t.columns) {
        (Some(column), None) => {
            vec![(None, Ident::column(column).map_err(|e| ident_error("target.column", e))?)]
        }
        (None, Some(map)) if !map.is_empty() => {
            if matches!(processor, Processor::Onnx(OnnxModel { output: OnnxOutput::Embedding, .. })) {
                return Err(usage("`target.columns`: an embedding goes into one `target.column`"));
            }
            let mut out = Vec::new();
            for (key, column) in map {
                let ident = Ident::column(column)
                    .map_err(|e| ident_error(&format!("target.columns.{key}"), e))?;
                out.push((Some(key.clone()), ident));
            }
            out
        }
        (Some(_), Some(_)) => {
            return Err(usage("`target`: set either `column` or `columns`, not both"));
        }
        _ => {
            return Err(usage(
                "`target.column` is missing: name the column the output goes into \
                 (or `target.columns = { key = \"column\" }` for an object per item)",
            ));
        }
    };
    for (_, column) in &outputs {
        if *column == source.id || source.columns.contains(column) {
            return Err(usage(format!(
                "`target`: column `{}` is also a source column; write outputs into their own column",
                column.name()
            )));
        }
    }
    let format = match (processor, t.format.as_deref()) {
        (Processor::Chat(_), None | Some("text")) => TargetFormat::Text,
        (Processor::Chat(_), Some(other)) => {
            return Err(usage(format!(
                "`target.format` = {other:?} is for local-model jobs; chat jobs write text (remove the key)"
            )));
        }
        (Processor::Onnx(m), format) => match (&m.output, format) {
            (OnnxOutput::Classification { .. }, None | Some("text")) => TargetFormat::Text,
            (OnnxOutput::Embedding, None | Some("json")) => TargetFormat::JsonArray,
            (OnnxOutput::Embedding, Some("f32le")) => TargetFormat::F32Le,
            (_, Some(other)) => {
                return Err(usage(format!(
                    "`target.format` = {other:?}: use \"json\" (array of floats) or \"f32le\" (BLOB/bytea) for embeddings"
                )));
            }
        },
    };
    if let Processor::Onnx(OnnxModel { output: OnnxOutput::Classification { .. }, .. }) = processor {
        let keys: BTreeSet<&str> = outputs.iter().filter_map(|(k, _)| k.as_deref()).collect();
        if outputs.len() > 1 && !keys.iter().all(|k| matches!(*k, "label" | "probability")) {
            return Err(usage(
                "`target.columns`: a classification writes `label` and `probability`; map those keys",
            ));
        }
    }
    Ok(Target { outputs, overwrite: t.overwrite, format })
}

fn processor(dir: &Path, file: &JobFile, options: &LoadOptions) -> anyhow::Result<Processor> {
    let m = &file.model;
    match m.kind.as_str() {
        "chat" => chat(dir, file, options).map(Processor::Chat),
        "onnx" => onnx(dir, m).map(Processor::Onnx),
        other => Err(usage(format!("`model.kind` = {other:?}: use \"chat\" or \"onnx\""))),
    }
}

fn refuse_keys(present: &[(&str, bool)], kind: &str) -> anyhow::Result<()> {
    for (key, is_set) in present {
        if *is_set {
            return Err(usage(format!(
                "`model.{key}` does not apply to kind = \"{kind}\"; remove it or change `model.kind`"
            )));
        }
    }
    Ok(())
}

fn batch_settings(m: &ModelFile) -> anyhow::Result<BatchSettings> {
    use crate::provider::batch::{BatchLimits, Dialect};
    let dialect = match m.batch_api.as_deref().unwrap_or("openai") {
        "openai" => Dialect::OpenAi,
        "anthropic" => Dialect::Anthropic,
        other => {
            return Err(usage(format!(
                "`model.batch_api` = {other:?}: use \"openai\" (OpenAI Batch API) or \"anthropic\" (Message Batches)"
            )));
        }
    };
    let poll = Range::above(0.0, MAX_SECONDS, "seconds").check("model.batch_poll_s", m.batch_poll_s.unwrap_or(30.0))?;
    let provider = match dialect {
        Dialect::OpenAi => BatchLimits::OPENAI,
        Dialect::Anthropic => BatchLimits::ANTHROPIC,
    };
    let limits = match (m.batch_max_requests, m.batch_max_mb) {
        (None, None) => None,
        (requests, mb) => {
            let max_requests = requests.unwrap_or(provider.max_requests as u64);
            let max_bytes = mb.map(|mb| mb * 1024.0 * 1024.0).unwrap_or(provider.max_bytes as f64);
            if max_requests == 0 || max_requests > provider.max_requests as u64 {
                return Err(usage(format!(
                    "`model.batch_max_requests` must be between 1 and {} (the provider's limit)",
                    provider.max_requests
                )));
            }
            if !(max_bytes.is_finite() && max_bytes >= 1024.0 && max_bytes <= provider.max_bytes as f64) {
                return Err(usage(format!(
                    "`model.batch_max_mb` must be between 0.001 and {} (the provider's limit)",
                    provider.max_bytes / (1024 * 1024)
                )));
            }
            Some(BatchLimits { max_requests: max_requests as usize, max_bytes: max_bytes as usize })
        }
    };
    Ok(BatchSettings { dialect, poll: Duration::from_secs_f64(poll), limits })
}

fn chat(dir: &Path, file: &JobFile, options: &LoadOptions) -> anyhow::Result<ChatModel> {
    let m = &file.model;
    refuse_keys(
        &[
            ("path", m.path.is_some()),
            ("tokenizer", m.tokenizer.is_some()),
            ("input", m.input.is_some()),
            ("output", m.output.is_some()),
            ("labels", m.labels.is_some()),
            ("pooling", m.pooling.is_some()),
            ("max_length", m.max_length.is_some()),
            ("max_batch_tokens", m.max_batch_tokens.is_some()),
            ("threads", m.threads.is_some()),
            ("precision", m.precision.is_some()),
        ],
        "chat",
    )?;
    let name = m
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| usage("`model.name` is missing: name the model to call, e.g. \"gpt-4o-mini\""))?;
    let base_url = m
        .base_url
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| std::env::var("OPENAI_BASE_URL").ok().filter(|u| !u.is_empty()))
        .ok_or_else(|| {
            usage("`model.base_url` is missing: set it (e.g. https://api.openai.com/v1) or set OPENAI_BASE_URL")
        })?;
    let parsed = reqwest::Url::parse(&base_url)
        .map_err(|e| usage(format!("`model.base_url` = {:?} is not a URL: {e}", crate::secret::redact_url(&base_url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(usage("`model.base_url` must start with http:// or https://"));
    }
    if parsed.query().is_some() {
        return Err(usage(format!(
            "`model.base_url` = {:?} has a query string, which the API's paths cannot follow: give the API root \
             (on Azure OpenAI, its v1 API: https://RESOURCE.openai.azure.com/openai/v1, with the deployment as model.name)",
            crate::secret::redact_url(&base_url)
        )));
    }
    let max_tokens_field = match m.max_tokens_field.as_deref() {
        None => super::MaxTokensField::for_url(&base_url),
        Some("max_tokens") => super::MaxTokensField::MaxTokens,
        Some("max_completion_tokens") => super::MaxTokensField::MaxCompletionTokens,
        Some(other) => {
            return Err(usage(format!(
                "`model.max_tokens_field` = {other:?}: use \"max_tokens\" or \"max_completion_tokens\" (OpenAI's reasoning models need the latter)"
            )));
        }
    };
    let structured_output = match m.structured_output.as_deref().unwrap_or("json_object") {
        "json_schema" => StructuredOutput::JsonSchema,
        "json_object_schema" => StructuredOutput::JsonObjectSchema,
        "json_object" => StructuredOutput::JsonObject,
        "none" => StructuredOutput::None,
        other => {
            return Err(usage(format!(
                "`model.structured_output` = {other:?}: use \"json_schema\" (OpenAI strict schema), \
                 \"json_object_schema\" (llama.cpp), \"json_object\" or \"none\""
            )));
        }
    };
    let mode = match m.mode.as_deref().unwrap_or("sync") {
        _ if options.batch_api => Mode::Batch,
        "sync" => Mode::Sync,
        "batch" => Mode::Batch,
        other => return Err(usage(format!("`model.mode` = {other:?}: use \"sync\" or \"batch\""))),
    };
    let stream = match m.stream.as_deref().unwrap_or("auto") {
        "auto" => Streaming::Auto,
        "always" => Streaming::Always,
        "never" => Streaming::Never,
        other => return Err(usage(format!("`model.stream` = {other:?}: use \"auto\", \"always\" or \"never\""))),
    };
    let batch = batch_settings(m)?;
    let api_key_env = m.api_key_env.clone().unwrap_or_else(|| "OPENAI_API_KEY".into());
    if api_key_env.is_empty() || !api_key_env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(usage(
            "`model.api_key_env` names the environment variable holding the key (e.g. \"OPENAI_API_KEY\"), not the key itself",
        ));
    }
    let context_window = m.context_window.unwrap_or(128_000);
    Range::between(1.0, MAX_CONTEXT_WINDOW as f64, "tokens").check_int("model.context_window", context_window.into())?;
    let per_item = m.max_output_tokens_per_item.unwrap_or(200);
    Range::between(1.0, context_window as f64, "tokens (the context window)")
        .check_int("model.max_output_tokens_per_item", per_item.into())?;
    if let Some(max_tokens) = m.max_tokens {
        Range::between(1.0, context_window as f64, "tokens (the context window)").check_int("model.max_tokens", max_tokens.into())?;
    }
    if let Some(t) = m.temperature
        && !(0.0..=2.0).contains(&t) {
            return Err(usage("`model.temperature` must be between 0 and 2"));
        }
    let timeout =
        Range::above(0.0, MAX_SECONDS, "seconds").check("model.request_timeout_s", m.request_timeout_s.unwrap_or(120.0))?;
    let expected = m.expected_output_tokens_per_item.unwrap_or(per_item);
    if expected == 0 || expected > per_item {
        return Err(usage(format!(
            "`model.expected_output_tokens_per_item` = {expected}: it must be at least 1 and at most \
             `model.max_output_tokens_per_item` ({per_item})"
        )));
    }
    let encoding = m.encoding.clone().unwrap_or_else(|| crate::tokens::DEFAULT_ENCODING.into());
    check_encoding(&encoding, "model.encoding")?;
    let max_response_bytes = m.max_response_bytes.unwrap_or(ChatModel::DEFAULT_MAX_RESPONSE_BYTES);
    if !(1024..=1 << 32).contains(&max_response_bytes) {
        return Err(usage(format!(
            "`model.max_response_bytes` = {max_response_bytes}: it must be between 1024 and 4294967296 (4 GiB); \
             the default is 8388608 (8 MiB)"
        )));
    }
    let prompt = file.prompt.as_ref().ok_or_else(|| {
        usage("`[prompt]` is missing: chat jobs need `template = \"prompts/….md\"` with {{items}} in it")
    })?;
    let template_path = resolve(dir, &prompt.template, "prompt.template")?;
    let template = std::fs::read_to_string(&template_path).map_err(|e| {
        usage(format!("`prompt.template`: cannot read {}: {e}", template_path.display()))
    })?;
    if !template.contains("{{items}}") {
        return Err(usage(format!(
            "`prompt.template`: {} has no {{{{items}}}} placeholder; put it where the items' JSON array goes",
            template_path.display()
        )));
    }
    let system = match &prompt.system {
        Some(p) => {
            let path = resolve(dir, p, "prompt.system")?;
            Some(std::fs::read_to_string(&path).map_err(|e| {
                usage(format!("`prompt.system`: cannot read {}: {e}", path.display()))
            })?)
        }
        None => None,
    };
    Ok(ChatModel {
        base_url,
        api_key_required: m.api_key_env.is_some(),
        api_key_env,
        name,
        fallback: m.fallback.clone(),
        structured_output,
        mode,
        stream,
        batch,
        max_output_tokens_per_item: per_item,
        expected_output_tokens_per_item: expected,
        temperature: m.temperature,
        request_timeout: Duration::from_secs_f64(timeout),
        context_window,
        max_tokens: m.max_tokens,
        max_tokens_field,
        encoding,
        max_response_bytes,
        template,
        system,
    })
}

fn onnx(dir: &Path, m: &ModelFile) -> anyhow::Result<OnnxModel> {
    refuse_keys(
        &[
            ("base_url", m.base_url.is_some()),
            ("structured_output", m.structured_output.is_some()),
            ("api_key_env", m.api_key_env.is_some()),
            ("fallback", !m.fallback.is_empty()),
            ("mode", m.mode.is_some()),
            ("stream", m.stream.is_some()),
            ("batch_api", m.batch_api.is_some()),
            ("batch_poll_s", m.batch_poll_s.is_some()),
            ("batch_max_requests", m.batch_max_requests.is_some()),
            ("batch_max_mb", m.batch_max_mb.is_some()),
            ("max_output_tokens_per_item", m.max_output_tokens_per_item.is_some()),
            ("expected_output_tokens_per_item", m.expected_output_tokens_per_item.is_some()),
            ("temperature", m.temperature.is_some()),
            ("encoding", m.encoding.is_some()),
            ("request_timeout_s", m.request_timeout_s.is_some()),
            ("context_window", m.context_window.is_some()),
            ("max_tokens", m.max_tokens.is_some()),
            ("max_response_bytes", m.max_response_bytes.is_some()),
            ("max_tokens_field", m.max_tokens_field.is_some()),
        ],
        "onnx",
    )?;
    let path = resolve(dir, m.path.as_deref().ok_or_else(|| usage("`model.path` is missing: the .onnx file to run"))?, "model.path")?;
    let tokenizer = resolve(
        dir,
        m.tokenizer.as_deref().ok_or_else(|| usage("`model.tokenizer` is missing: the model's tokenizer.json"))?,
        "model.tokenizer",
    )?;
    let input = m.input.clone().ok_or_else(|| {
        usage("`model.input` is missing: a template over the source columns, e.g. \"{{title}}\\n{{text}}\"")
    })?;
    let output = match m.output.as_deref().unwrap_or("embedding") {
        "embedding" => OnnxOutput::Embedding,
        "classification" => {
            let labels = m.labels.clone().filter(|l| !l.is_empty()).ok_or_else(|| {
                usage("`model.labels` is missing: a classification needs the model's labels in output order")
            })?;
            OnnxOutput::Classification { labels }
        }
        other => return Err(usage(format!("`model.output` = {other:?}: use \"embedding\" or \"classification\""))),
    };
    let pooling = match m.pooling.as_deref().unwrap_or("mean") {
        "mean" => backfill_onnx::Pooling::Mean,
        "cls" => backfill_onnx::Pooling::Cls,
        other => return Err(usage(format!("`model.pooling` = {other:?}: use \"mean\" or \"cls\" (the first token's state)"))),
    };
    let max_length = m.max_length.unwrap_or(256);
    Range::between(1.0, 65_536.0, "tokens").check_int("model.max_length", max_length.into())?;
    // Small forward passes are fastest under tract (crates/onnx/README.md): one long row alone.
    let max_batch_tokens = m.max_batch_tokens.unwrap_or(max_length.max(256));
    Range::between(max_length as f64, 16_777_216.0, "tokens (the low end is `model.max_length`)")
        .check_int("model.max_batch_tokens", max_batch_tokens.into())?;
    let threads = m.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
    });
    Range::between(1.0, 1024.0, "threads").check_int("model.threads", threads.into())?;
    let bf16_products = match m.precision.as_deref().unwrap_or("auto") {
        "auto" => true,
        "f32" => false,
        other => {
            return Err(usage(format!(
                "`model.precision` = {other:?}: use \"auto\" (bf16 products where the CPU has AVX512-BF16) or \"f32\""
            )));
        }
    };
    Ok(OnnxModel { path, tokenizer, input, output, pooling, max_length, max_batch_tokens, threads, bf16_products })
}

/// The names inside `{{…}}` in `template`, in order (trimmed; duplicates kept).
fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else { break };
        names.push(after[..close].trim());
        rest = &after[close + 2..];
    }
    names
}

/// Every `{{name}}` of a local model's `input` is a source column (or the id).
fn check_input_template(input: &str, source: &Source) -> anyhow::Result<()> {
    let names = placeholders(input);
    if names.is_empty() {
        return Err(usage(format!(
            "`model.input` = {input:?} names no column: write the text the model sees, e.g. \"{{{{title}}}}\\n{{{{text}}}}\""
        )));
    }
    for name in names {
        if name != "id" && !source.columns.iter().any(|c| c.name() == name) {
            return Err(usage(format!(
                "`model.input`: `{{{{{name}}}}}` is not in `source.columns`; add the column there or fix the name"
            )));
        }
    }
    Ok(())
}

fn bounds(key: &str, r: RangeFile, defaults: (u32, u32, u32)) -> anyhow::Result<Bounds> {
    let (start, min, max) = r.resolve(defaults);
    if min == 0 || min > start || start > max || max > MAX_RANGE {
        return Err(usage(format!(
            "`limits.{key}` = {{ start = {start}, min = {min}, max = {max} }}{}: need 1 <= min <= start <= max, and max at most {MAX_RANGE}",
            if r.start.is_some() && r.min.is_some() && r.max.is_some() { "" } else { " (with the defaults of what it leaves out)" }
        )));
    }
    Ok(Bounds { start, min, max })
}

fn limits(file: &JobFile) -> anyhow::Result<Limits> {
    let l = &file.limits;
    if let Some(rpm) = l.requests_per_minute {
        Range::between(0.01, 1e8, "requests per minute").check("limits.requests_per_minute", rpm)?;
    }
    if let Some(tpm) = l.tokens_per_minute {
        Range::between(1.0, 1e12, "tokens per minute").check("limits.tokens_per_minute", tpm)?;
    }
    Range::between(1.0, 100.0, "attempts").check_int("limits.max_attempts", l.max_attempts.into())?;
    Range::between(5.0, MAX_SECONDS, "seconds").check("limits.lease_seconds", l.lease_seconds)?;
    Range::between(0.0, MAX_SECONDS, "seconds").check("limits.grace_seconds", l.grace_seconds)?;
    Range::between(0.0, 1.0, "(a share of the run's items)").check("limits.max_failed_share", l.max_failed_share)?;
    Range::between(0.0, MAX_SECONDS, "seconds").check("limits.outage_window_s", l.outage_window_s)?;
    if !(l.max_retry_after_s.is_finite() && (1.0..=30.0 * 86_400.0).contains(&l.max_retry_after_s)) {
        return Err(usage(format!(
            "`limits.max_retry_after_s` = {}: it must be between 1 and 2592000 seconds (30 days); the default is 3600",
            l.max_retry_after_s
        )));
    }
    Ok(Limits {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        items_per_request: bounds("items_per_request", l.items_per_request, super::file::DEFAULT_ITEMS)?,
        concurrency: bounds("concurrency", l.concurrency, super::file::DEFAULT_CONCURRENCY)?,
        max_attempts: l.max_attempts,
        lease: Duration::from_secs_f64(l.lease_seconds),
        grace: Duration::from_secs_f64(l.grace_seconds),
        max_failed_share: l.max_failed_share,
        max_retry_after: Duration::from_secs_f64(l.max_retry_after_s),
        outage_window: Duration::from_secs_f64(l.outage_window_s),
    })
}

fn check_encoding(encoding: &str, key: &str) -> anyhow::Result<()> {
    if crate::tokens::ENCODINGS.contains(&encoding) {
        Ok(())
    } else {
        Err(usage(format!("`{key}` = {encoding:?}: use one of {}", crate::tokens::ENCODINGS.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_given_in_part_takes_the_rest_from_its_defaults() {
        let range = |start, min, max| RangeFile { start, min, max };
        let concurrency = crate::job::file::DEFAULT_CONCURRENCY;
        let of = |r| bounds("concurrency", r, concurrency).map(|b| (b.start, b.min, b.max)).map_err(|e| e.to_string());
        assert_eq!(of(range(None, None, None)), Ok((4, 1, 64)));
        assert_eq!(of(range(None, None, Some(2))), Ok((2, 1, 2)));
        assert_eq!(of(range(None, Some(8), None)), Ok((8, 8, 64)));
        assert_eq!(of(range(Some(100), None, None)), Ok((100, 1, 100)));
        assert_eq!(of(range(Some(2), Some(1), Some(3))), Ok((2, 1, 3)));
        let refused = of(range(None, Some(5), Some(3))).unwrap_err();
        assert!(refused.contains("min = 5, max = 3 } (with the defaults of what it leaves out)"), "{refused}");
        assert!(of(range(None, None, Some(0))).is_err());
        assert!(of(range(Some(1), Some(1), Some(100_000_000))).unwrap_err().contains("need 1 <= min <= start <= max"));
    }

    #[test]
    fn placeholders_are_listed_trimmed() {
        assert_eq!(placeholders("{{title}}\n{{ text }} {{"), vec!["title", "text"]);
    }
}
