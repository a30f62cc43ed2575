//! `init`: a commented job file and a prompt template written from a table's columns, ready
//! for `backfill run JOB --dry-run`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::exit::{Exit, usage};
use crate::ident::Ident;
use crate::store::ColumnShape;

/// The model a new job names unless `BACKFILL_MODEL` says otherwise, priced from the bundled
/// OpenAI price file so the job's dry run can cost it.
const DEFAULT_MODEL: &str = "gpt-4o-mini";
const OPENAI_PRICES: &str = include_str!("../../prices/openai.toml");

pub struct InitArgs<'a> {
    pub database: &'a str,
    pub table: &'a str,
    pub column: &'a str,
    pub id: Option<&'a str>,
    pub output: Option<&'a Path>,
}

pub async fn init(args: InitArgs<'_>) -> anyhow::Result<Exit> {
    let table = Ident::table(args.table).map_err(|e| usage(format!("--table {}: {e}", args.table)))?;
    let cwd = std::env::current_dir()?;
    let url = crate::job::database_url(&cwd, Some(args.database), None)?;
    let job_path = args.output.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(format!("{}.toml", table.name())));
    let stem = job_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "job".into());
    let prompt_name = format!("{stem}.prompt.md");
    let job_dir = std::path::absolute(job_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?;
    let prompt_path = job_dir.join(&prompt_name);
    for path in [&job_path, &prompt_path] {
        if path.exists() {
            return Err(usage(format!("{} exists already; init never overwrites a file: choose another --output", path.display())));
        }
    }

    let store = crate::store::open_read_only(&url).await?;
    let columns = store.describe(&table).await?;
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    if !names.contains(&args.column) {
        return Err(usage(format!(
            "--column {}: table {} has no such column (it has: {}); add it first, e.g. ALTER TABLE {} ADD COLUMN {} TEXT",
            args.column,
            table.raw(),
            names.join(", "),
            table.raw(),
            args.column
        )));
    }
    let id = match args.id {
        Some(id) if names.contains(&id) => id.to_owned(),
        Some(id) => return Err(usage(format!("--id {id}: table {} has no such column (it has: {})", table.raw(), names.join(", ")))),
        None => match columns.iter().filter(|c| c.primary_key).collect::<Vec<_>>()[..] {
            [key] => key.name.clone(),
            _ => {
                return Err(usage(format!(
                    "table {} has no single-column primary key: name the column that identifies a row with --id (it has: {})",
                    table.raw(),
                    names.join(", ")
                )));
            }
        },
    };
    let inputs = input_columns(&columns, &id, args.column);
    let database = database_for(&url, &job_dir);
    let job = job_text(&JobShape { name: &stem, database: &database, table: &table.raw(), id: &id, column: args.column, inputs: &inputs, prompt: &prompt_name, columns: &columns });
    let prompt = prompt_text(&table.raw(), args.column, &inputs);
    // Both files or neither: the prompt first, removed again when the job cannot be written.
    write_new(&prompt_path, &prompt)?;
    if let Err(e) = write_new(&job_path, &job) {
        let _ = std::fs::remove_file(&prompt_path);
        return Err(e);
    }
    eprintln!(
        "wrote {} and {} (input columns: {}); edit the prompt, then `backfill run {} --dry-run`",
        job_path.display(),
        job_path.with_file_name(&prompt_name).display(),
        inputs.join(", "),
        job_path.display()
    );
    Ok(Exit::Finished)
}

/// The text-like columns other than the id and the target; every other column when none is.
fn input_columns(columns: &[ColumnShape], id: &str, target: &str) -> Vec<String> {
    let others: Vec<&ColumnShape> = columns.iter().filter(|c| c.name != id && c.name != target).collect();
    let text: Vec<String> = others.iter().filter(|c| c.is_text()).map(|c| c.name.clone()).collect();
    if text.is_empty() { others.iter().map(|c| c.name.clone()).collect() } else { text }
}

/// The database as the job names it: a SQLite file relative to the job when it lies below
/// it, else absolute; a PostgreSQL URL with its password left out (set it in the URL or in
/// `PGPASSWORD` / `.pgpass`).
fn database_for(url: &crate::secret::DatabaseUrl, job_dir: &Path) -> String {
    if url.is_sqlite() {
        let raw = url.expose();
        let rest = raw.strip_prefix("sqlite://").unwrap_or(raw);
        let (file, query) = rest.split_once('?').map(|(f, q)| (f, format!("?{q}"))).unwrap_or((rest, String::new()));
        let file = Path::new(file);
        let shown = file.strip_prefix(job_dir).unwrap_or(file);
        return format!("sqlite://{}{query}", shown.display());
    }
    match url::Url::parse(url.expose()) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        _ => url.expose().to_owned(),
    }
}

struct JobShape<'a> {
    name: &'a str,
    database: &'a str,
    table: &'a str,
    id: &'a str,
    column: &'a str,
    inputs: &'a [String],
    prompt: &'a str,
    columns: &'a [ColumnShape],
}

/// A TOML basic string: JSON's string escapes are TOML's.
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// The default model's `[pricing.…]` lines, from the bundled price file.
fn default_pricing() -> String {
    let table: toml::Table = OPENAI_PRICES.parse().expect("the bundled price file parses");
    let date = table.get("date").and_then(|d| d.as_str()).unwrap_or("unknown").to_owned();
    let mut out = format!("# {DEFAULT_MODEL}'s prices, USD per million tokens, as OpenAI listed them on {date}: check them before\n# a large run. Another model needs its own table here, or a price file in `prices`.\n[pricing.{}]\n", toml_string(DEFAULT_MODEL));
    if let Some(model) = table.get("models").and_then(|m| m.get(DEFAULT_MODEL)).and_then(|m| m.as_table()) {
        for key in ["input", "cached_input", "output", "batch_input", "batch_output"] {
            if let Some(value) = model.get(key).and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64))) {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
    }
    out
}

fn job_text(j: &JobShape<'_>) -> String {
    let list = |names: &[String]| names.iter().map(|n| toml_string(n)).collect::<Vec<_>>().join(", ");
    let described: Vec<String> = j
        .columns
        .iter()
        .map(|c| format!("#   {}{} {}", c.name, if c.primary_key { " (primary key)" } else { "" }, if c.sql_type.is_empty() { "(no declared type)" } else { &c.sql_type }))
        .collect();
    format!(
        r#"# Fills {table}.{column} with a model's answers. Written by `backfill init`; every key is described
# in README.md ("Job file reference"). Paths are relative to this file.
#
#   backfill run {name}.toml --dry-run     what the run would send and cost
#   backfill run {name}.toml               run it (`--resume` continues it after a stop)
#
# The table's columns when this file was written:
{described}

name = {name_s}

[source]
database = {database}
table = {table_s}
# The column that identifies a row; answers come back under it.
id = {id}
# What the model reads of each row (the text columns other than the target).
columns = [{inputs}]
# Rows still to do: the run takes these, and a resumed run only those still pending.
pending = {pending}

[target]
column = {column_s}
# overwrite = true    # also write rows whose target already holds a value

[prompt]
template = {prompt}
# system = "system.md"

[model]
# Any OpenAI-compatible endpoint; without OPENAI_BASE_URL, OpenAI's.
base_url = "${{OPENAI_BASE_URL:-https://api.openai.com/v1}}"
name = "${{BACKFILL_MODEL:-{model}}}"
# The key comes from this variable; a run without it stops before sending anything.
api_key_env = "OPENAI_API_KEY"
# "json_schema" forces the batch's ids (OpenAI); "json_object" for servers without schemas.
structured_output = "json_schema"
# Output tokens one row's answer may take, and usually takes (for the dry run's estimate).
max_output_tokens_per_item = 200
expected_output_tokens_per_item = 100
temperature = 0.2
request_timeout_s = 120
# mode = "batch"      # the provider's batch API: half price, within 24 hours

{pricing}
[limits]
# Rows per request and requests in flight: the controller moves between min and max while
# the provider keeps up, and backs off on 429s and timeouts.
items_per_request = {{ start = 10, min = 1, max = 40 }}
concurrency = {{ start = 4, min = 1, max = 32 }}
# requests_per_minute = 500
# tokens_per_minute = 200000
max_attempts = 4
# A run that ends with more than this share of its rows failed or rejected exits 6.
max_failed_share = 0.1

[budget]
# The run stops here (exit 3); `--resume --max-usd USD` continues with a higher cap.
max_usd = 5.00

[postprocess]
# Rules applied to every answer before it is written; a rejected answer is asked again.
# Left empty, answers are only tidied (normalize = true: stray spaces, zero-width characters).
# Try them with `backfill check {name}.toml < answer.txt`. For example:
# script = "Latin"            # drop lines in other writing systems
# language = "en"             # count foreign words against the lexicons (lexicons/)
# max_foreign_words = 2
# strip = ['\(\d+-\d+\)']     # regular expressions whose matches are removed
# min_chars = 20
# max_chars = 1200
"#,
        table = j.table,
        column = j.column,
        name = j.name,
        described = described.join("\n"),
        name_s = toml_string(j.name),
        database = toml_string(j.database),
        table_s = toml_string(j.table),
        id = toml_string(j.id),
        inputs = list(j.inputs),
        pending = toml_string(&format!("{} IS NULL", quoted(j.column))),
        column_s = toml_string(j.column),
        prompt = toml_string(j.prompt),
        model = DEFAULT_MODEL,
        pricing = default_pricing(),
    )
}

/// A column name as the pending predicate's SQL needs it: plain when it is a simple lowercase
/// identifier, else double-quoted.
fn quoted(column: &str) -> String {
    let plain = column.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && column.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { column.to_owned() } else { format!("\"{}\"", column.replace('"', "\"\"")) }
}

fn prompt_text(table: &str, column: &str, inputs: &[String]) -> String {
    format!(
        "For each of these {{{{count}}}} rows of `{table}`, write its `{column}`.\n\
         \n\
         Each row gives its `id` and: {inputs}.\n\
         Describe here what `{column}` should say, in which language, and how long it should be.\n\
         \n\
         Answer with one JSON object whose keys are the rows' ids and whose values are the texts.\n\
         \n\
         {{{{items}}}}\n",
        inputs = inputs.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
    )
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            usage(format!("{} exists already; init never overwrites a file: choose another --output", path.display()))
        } else {
            anyhow::anyhow!("cannot write {}: {e}", path.display())
        }
    })?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, sql_type: &str, primary_key: bool) -> ColumnShape {
        ColumnShape { name: name.into(), sql_type: sql_type.into(), primary_key }
    }

    #[test]
    fn inputs_are_the_text_columns_but_the_id_and_the_target() {
        let columns = [col("id", "INTEGER", true), col("title", "TEXT", false), col("n", "INTEGER", false), col("body", "character varying(200)", false), col("summary", "TEXT", false)];
        assert_eq!(input_columns(&columns, "id", "summary"), ["title", "body"]);
        let numbers = [col("id", "INTEGER", true), col("n", "REAL", false), col("summary", "TEXT", false)];
        assert_eq!(input_columns(&numbers, "id", "summary"), ["n"]);
        assert_eq!(quoted("summary"), "summary");
        assert_eq!(quoted("Summary"), "\"Summary\"");
    }

    #[test]
    fn the_written_job_parses_and_prices_its_model() {
        let columns = [col("id", "INTEGER", true), col("title", "TEXT", false), col("summary", "TEXT", false)];
        let inputs = vec!["title".to_owned()];
        let text = job_text(&JobShape { name: "items", database: "sqlite://items.db", table: "items", id: "id", column: "summary", inputs: &inputs, prompt: "items.prompt.md", columns: &columns });
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["source"]["pending"].as_str(), Some("summary IS NULL"));
        assert!(parsed["pricing"][DEFAULT_MODEL]["input"].as_float().is_some(), "{text}");
        assert!(prompt_text("items", "summary", &inputs).contains("{{items}}"));
    }
}
