//! The operator's commands beside `run`: their flags, and each turned into its call.

use std::path::PathBuf;

use clap::Args;

use super::{DatabaseArgs, load};
use crate::exit::Exit;
use crate::job::LoadOptions;

#[derive(Debug, Args)]
pub(super) struct FailuresArgs {
    #[command(flatten)]
    target: DatabaseArgs,
    /// The run whose items to list (default: the latest).
    #[arg(long, value_name = "ID")]
    run: Option<i64>,
    /// Only items in this state.
    #[arg(long, value_name = "failed|rejected")]
    state: Option<String>,
    /// At most N items (default: 20 in the text, all with --json or --jsonl).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Print one JSON object: the run, its counts and every item with its whole answer.
    #[arg(long, conflicts_with = "jsonl")]
    json: bool,
    /// Print one JSON line per item.
    #[arg(long)]
    jsonl: bool,
}

#[derive(Debug, Args)]
pub(super) struct InitArgs {
    /// The database holding the table (sqlite://path.db or postgres://…).
    #[arg(long, value_name = "URL")]
    database: String,
    /// The table to fill (schema.table on PostgreSQL when it is not on the search path).
    #[arg(long, value_name = "TABLE")]
    table: String,
    /// The column to fill; the job's pending rows are those where it IS NULL.
    #[arg(long, value_name = "COLUMN")]
    column: String,
    /// The column that identifies a row (default: the table's primary key).
    #[arg(long, value_name = "COLUMN")]
    id: Option<String>,
    /// The job file to write (default: TABLE.toml); the prompt goes beside it as NAME.prompt.md.
    /// Existing files are never overwritten.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct BatchesArgs {
    #[command(flatten)]
    target: DatabaseArgs,
    /// The run whose batches to list (default: the latest).
    #[arg(long, value_name = "ID")]
    run: Option<i64>,
    /// Ask the provider to cancel the run's unfinished batches, and record what it answered.
    #[arg(long)]
    cancel: bool,
    /// Print the batches (and what --cancel did) as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn read_only() -> LoadOptions {
    LoadOptions { allow_unpriced: true, ..LoadOptions::default() }
}

pub(super) async fn failures(args: FailuresArgs) -> anyhow::Result<Exit> {
    let job = load(&args.target, read_only())?;
    let format = match (args.json, args.jsonl) {
        (true, _) => super::failures::Format::Json,
        (_, true) => super::failures::Format::JsonLines,
        _ => super::failures::Format::Text,
    };
    super::failures::failures(&job, args.run, args.state.as_deref(), args.limit, format).await
}

pub(super) async fn init(args: InitArgs) -> anyhow::Result<Exit> {
    super::init::init(super::init::InitArgs {
        database: &args.database,
        table: &args.table,
        column: &args.column,
        id: args.id.as_deref(),
        output: args.output.as_deref(),
    })
    .await
}

pub(super) async fn batches(args: BatchesArgs) -> anyhow::Result<Exit> {
    let job = load(&args.target, read_only())?;
    super::batches::batches(&job, args.run, args.cancel, args.json).await
}
