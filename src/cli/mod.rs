//! The command line: raw flags (clap), turned into a validated job and options, dispatched to
//! one command, with every error printed once (with its causes) and mapped to an exit code.

mod batches;
mod failures;
mod init;
mod ops;
mod report;
mod status;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::exit::{Exit, exit_for_error, json_line, usage};
use crate::job::{Job, LoadOptions};

#[derive(Debug, Parser)]
#[command(
    name = "backfill",
    version,
    about = "Resumable batch backfills of a database column with an LLM or a local model",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const AFTER_HELP: &str = "\
Examples:
  backfill run jobs/motions_nl.toml --dry-run     what the run would send and cost
  backfill run jobs/motions_nl.toml --max-usd 5   run it, stopping at $5
  backfill run jobs/motions_nl.toml --resume      continue after a crash or a stop
  backfill status jobs/motions_nl.toml            items by state, cost, workers
  backfill report jobs/motions_nl.toml --chart run.svg
  echo 'Een tekst.' | backfill check jobs/motions_nl.toml
  backfill failures jobs/motions_nl.toml          failed and rejected items, with the answers
  backfill batches jobs/motions_nl.toml --cancel  cancel the run's unfinished provider batches
  backfill init --database sqlite://data.db --table notes --column summary
  backfill trial jobs/motions_nl.toml --models a,b --html trial.html   compare models on 20 rows

Exit codes:
  0 finished   1 error   2 bad usage or job file, nothing sent   3 budget cap reached
  4 interrupted (SIGINT/SIGTERM)   5 batch mode: still waiting for the provider
  6 finished with too many failures (`check`: the rules reject the text)

Environment:
  OPENAI_API_KEY (or the job's model.api_key_env)  the provider's key
  ${VAR} / ${VAR:-default} in the job file  any variable, expanded when the job loads
  RUST_LOG  log filter (default: warn,backfill=info,backfill_controller=info), e.g. RUST_LOG=backfill=debug
  NO_COLOR  logs without colour";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job (or --resume its unfinished run; --dry-run to estimate it).
    Run(RunArgs),
    /// Show the latest run of a job: items by state, cost per model, workers, the last 10 earlier runs.
    Status(StatusArgs),
    /// Report on a run: items, rejections, cost, throughput, the controller's path.
    Report(ReportArgs),
    /// Give up the unfinished run of a job, so `run` can start a new one.
    Abandon(DatabaseArgs),
    /// Try the job's post-processing rules on a text read from stdin (exit 6 when they reject it).
    Check(CheckArgs),
    /// List the failed and rejected items of a run with their reasons, errors and raw answers.
    Failures(ops::FailuresArgs),
    /// Write a commented job file and prompt template from a table's columns.
    Init(ops::InitArgs),
    /// List a run's provider batches (batch mode), or --cancel the unfinished ones.
    Batches(ops::BatchesArgs),
    /// Compare models on a seeded sample of pending rows with the job's prompt, rules and
    /// prices; writes nothing to the target column (the calls are paid and in the ledger).
    Trial(TrialArgs),
}

#[derive(Debug, Args)]
struct TrialArgs {
    #[command(flatten)]
    target: DatabaseArgs,
    /// The models to compare, comma-separated (default: the job's `model.name`).
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    models: Vec<String>,
    /// How many pending rows to sample, spread over input lengths.
    #[arg(long, value_name = "N", default_value_t = 20)]
    sample: usize,
    /// The sample's seed: the same seed draws the same rows.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,
    /// Also write one self-contained HTML page: the summary and every row beside each answer.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Print the trial as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Budget cap in USD for the trial's calls (overrides `budget.max_usd`).
    #[arg(long, value_name = "USD")]
    max_usd: Option<f64>,
    /// Try models that have no price (their cost counts as zero).
    #[arg(long)]
    allow_unpriced: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The job file (TOML) whose `[postprocess]` rules to apply.
    job: PathBuf,
    /// Print the outcome as JSON (final text, changes, foreign words, rejections).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// The job file (TOML).
    job: PathBuf,
    /// Database URL (sqlite://path.db or postgres://…); overrides `source.database`.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    target: DatabaseArgs,
    /// Send nothing, write nothing: estimate requests, tokens, cost and duration.
    #[arg(long)]
    dry_run: bool,
    /// Continue the latest unfinished run of the job (or start one if there is none).
    #[arg(long)]
    resume: bool,
    /// Only the first N pending items.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Budget cap in USD (overrides `budget.max_usd`).
    #[arg(long, value_name = "USD")]
    max_usd: Option<f64>,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Do not use the response cache.
    #[arg(long)]
    no_cache: bool,
    /// Run models that have no price (their cost counts as zero unless the provider reports one).
    #[arg(long)]
    allow_unpriced: bool,
    /// No progress bar or progress lines.
    #[arg(long, short)]
    quiet: bool,
    /// Run through the provider's batch API (half price, within 24 hours), as `model.mode = "batch"`.
    #[arg(long)]
    batch_api: bool,
    /// Batch mode: stop waiting for the provider's batches after this long (e.g. 30s, 8h) and exit 5;
    /// `--resume` collects them later. Default: wait until they end. `--wait 0` submits and exits.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wait: Option<std::time::Duration>,
    /// Batch mode: once the run is this old (e.g. 20h), cancel what the provider has not finished
    /// and send the rest through the synchronous API, so a deadline is met.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    finish_sync_after: Option<std::time::Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics while the run goes (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// Write the run's Prometheus metrics to PATH when it ends (node_exporter's textfile collector).
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,
    /// A new run over only the pending rows that also match this SQL predicate
    /// (e.g. "created_at > '2026-01-01'"), on top of the job's `source.pending`.
    #[arg(long = "where", value_name = "SQL", conflicts_with = "resume")]
    where_sql: Option<String>,
    /// A new run over only the pending rows whose ids are listed in FILE (one per line).
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    ids: Option<PathBuf>,
    /// A new run over only the rows that failed or were rejected in the job's latest run.
    #[arg(long, conflicts_with = "resume")]
    retry_failed: bool,
}

/// The longest `--wait` / `--finish-sync-after`: a year (batches end within a day).
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    if text.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let duration = humantime::parse_duration(text).map_err(|e| format!("{e}; write a duration such as 90s, 30m or 8h"))?;
    if duration > MAX_DURATION {
        return Err("must be at most a year (8760h)".into());
    }
    Ok(duration)
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    target: DatabaseArgs,
    /// Print the status as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// List every earlier run of the job (default: the last 10).
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct ReportArgs {
    #[command(flatten)]
    target: DatabaseArgs,
    /// The run to report on (default: the latest).
    #[arg(long, value_name = "ID")]
    run: Option<i64>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Draw items/s, items per request, concurrency, 429s and cumulative cost over time into
    /// an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return ExitCode::from(0);
            }
            // `run … --json` with a flag clap refuses still owes its cron line.
            let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
            if raw.get(1).is_some_and(|a| a == "run") && raw.iter().any(|a| a == "--json") {
                json_line::arm(raw.get(2).map(|a| a.to_string_lossy().into_owned()).unwrap_or_default());
                let message = e.render().to_string();
                json_line::write(Exit::Usage, message.lines().next().unwrap_or_default().trim_start_matches("error: "));
            }
            return ExitCode::from(Exit::Usage.code());
        }
    };
    if let Command::Run(args) = &cli.command
        && args.json
    {
        json_line::arm(args.target.job.display().to_string());
    }
    crate::logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("backfill: cannot start the async runtime: {e}");
            json_line::write(Exit::Error, &format!("cannot start the async runtime: {e}"));
            return ExitCode::from(Exit::Error.code());
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            eprintln!("backfill: {e:#}");
            let exit = exit_for_error(&e);
            json_line::write(exit, &format!("{e:#}"));
            ExitCode::from(exit.code())
        }
    }
}

fn load(args: &DatabaseArgs, options: LoadOptions) -> anyhow::Result<Job> {
    Job::load(&args.job, &LoadOptions { database: args.database.clone(), ..options })
}

async fn execute(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Status(args) => {
            let job = load(&args.target, LoadOptions { allow_unpriced: true, ..LoadOptions::default() })?;
            status::status(&job, args.json, args.all).await
        }
        Command::Report(args) => {
            let job = load(&args.target, LoadOptions { allow_unpriced: true, ..LoadOptions::default() })?;
            report::report(&job, args.run, args.json, args.chart.as_deref()).await
        }
        Command::Check(args) => check(args),
        Command::Failures(args) => ops::failures(args).await,
        Command::Init(args) => ops::init(args).await,
        Command::Batches(args) => ops::batches(args).await,
        Command::Trial(args) => trial(args).await,
        Command::Abandon(args) => {
            let job = load(&args, LoadOptions { allow_unpriced: true, ..LoadOptions::default() })?;
            status::abandon(&job).await
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<Exit> {
    if let Some(max) = args.max_usd
        && !(max.is_finite() && max > 0.0) {
            return Err(usage("--max-usd must be a positive number of USD"));
        }
    if let Some(limit) = args.limit
        && !(1..=i64::MAX as u64).contains(&limit)
    {
        return Err(usage(format!("--limit {limit}: must be at least 1 and at most {}", i64::MAX)));
    }
    let job = load(
        &args.target,
        LoadOptions {
            max_usd: args.max_usd,
            allow_unpriced: args.allow_unpriced,
            no_cache: args.no_cache,
            batch_api: args.batch_api,
            database: None,
        },
    )?;
    json_line::set_job(&job.name);
    let job = narrowed(job, &args).await?;
    if let Some(chat) = job.chat() {
        for model in chat.tiers().filter(|m| job.prices.origin(m) == Some(&crate::pricing::PriceOrigin::Unpriced)) {
            tracing::warn!(
                "model `{model}` has no price (--allow-unpriced): its calls count as free unless the provider reports \
                 a cost, and the budget cap cannot hold them back"
            );
        }
    }
    // A resumed run goes in the mode it was started with, which only the run knows.
    if (args.wait.is_some() || args.finish_sync_after.is_some())
        && !args.resume
        && job.chat().is_none_or(|c| c.mode != crate::job::Mode::Batch)
    {
        return Err(usage("--wait and --finish-sync-after are for batch mode: set `model.mode = \"batch\"` or pass --batch-api"));
    }
    if let (true, crate::job::Processor::Onnx(model)) = (args.dry_run, &job.processor) {
        let estimate = crate::dry_run::local::estimate(&job, model, args.limit).await?;
        if args.json {
            print_json(&estimate)?;
        } else {
            print_text(&estimate.human());
        }
        return Ok(Exit::Finished);
    }
    if args.dry_run {
        let estimate = crate::dry_run::estimate(&job, args.limit).await?;
        if args.json {
            print_json(&estimate)?;
        } else {
            print_text(&estimate.human());
        }
        return Ok(Exit::Finished);
    }
    let shutdown = crate::runner::install_signals()?;
    let options = crate::runner::RunOptions {
        resume: args.resume,
        limit: args.limit,
        quiet: args.quiet,
        wait: args.wait,
        finish_sync_after: args.finish_sync_after,
        max_usd: args.max_usd,
        batch_api: args.batch_api,
        metrics_addr: args.metrics_addr,
        metrics_file: args.metrics_file,
    };
    let outcome = crate::runner::run(&job, &options, shutdown).await?;
    let Some(summary) = outcome.summary else {
        let message = format!("nothing pending for job `{}` and no unfinished run: no run started", job.name);
        eprintln!("backfill: {message}");
        json_line::write_status("nothing_pending", outcome.exit, None, Some(&message));
        return Ok(outcome.exit);
    };
    eprintln!("{}", summary.human());
    if args.json {
        print_json(&summary)?;
    }
    Ok(outcome.exit)
}

async fn trial(args: TrialArgs) -> anyhow::Result<Exit> {
    if let Some(max) = args.max_usd
        && !(max.is_finite() && max > 0.0)
    {
        return Err(usage("--max-usd must be a positive number of USD"));
    }
    let job = load(&args.target, LoadOptions { max_usd: args.max_usd, allow_unpriced: args.allow_unpriced, ..LoadOptions::default() })?;
    let models: Vec<String> = args.models.iter().map(|m| m.trim().to_owned()).filter(|m| !m.is_empty()).collect();
    let options = crate::trial::TrialOptions { models, sample: args.sample, seed: args.seed, allow_unpriced: args.allow_unpriced };
    let (trial, exit) = crate::trial::trial(&job, &options).await?;
    if let Some(path) = &args.html {
        std::fs::write(path, crate::trial::html::page(&trial))
            .map_err(|e| anyhow::anyhow!("cannot write the trial page {}: {e}", path.display()))?;
    }
    if args.json {
        print_json(&trial)?;
    } else {
        let page = args.html.as_ref().map(|path| format!("\n  page: {}", path.display())).unwrap_or_default();
        print_text(&format!("{}{page}", trial.human()));
    }
    Ok(exit)
}

/// The job with its pending predicate narrowed by `--where`, `--ids` and `--retry-failed`: a
/// new run enqueues only the rows that match both.
async fn narrowed(mut job: Job, args: &RunArgs) -> anyhow::Result<Job> {
    let mut extra = Vec::new();
    if let Some(sql) = &args.where_sql {
        if sql.trim().is_empty() || sql.contains(';') {
            return Err(usage("--where: write one SQL predicate over the source table's columns, without `;`"));
        }
        extra.push(sql.clone());
    }
    let id = format!("{}.{}", job.source.table, job.source.id);
    if let Some(file) = &args.ids {
        let text = std::fs::read_to_string(file).map_err(|e| usage(format!("--ids {}: cannot read it: {e}", file.display())))?;
        let ids: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(|line| format!("'{}'", line.replace('\'', "''")))
            .collect();
        if ids.is_empty() {
            return Err(usage(format!("--ids {}: the file lists no id (one per line)", file.display())));
        }
        extra.push(format!("CAST({id} AS TEXT) IN ({})", ids.join(", ")));
    }
    if args.retry_failed {
        let (_, latest) = status::chosen_run(&job, None, false).await?;
        if latest.status.is_unfinished() {
            return Err(usage(format!(
                "--retry-failed starts a new run over the failed rows of the latest one, but run {} of job `{}` is \
                 unfinished: continue it with --resume, or give it up with `backfill abandon`",
                latest.id, job.name
            )));
        }
        extra.push(format!(
            "CAST({id} AS TEXT) IN (SELECT item_id FROM backfill_items WHERE run_id = {} AND state IN ('failed', 'rejected'))",
            latest.id
        ));
    }
    if !extra.is_empty() {
        let narrowed: Vec<String> = std::iter::once(job.source.pending.clone()).chain(extra).map(|p| format!("({p})")).collect();
        job.source.pending = narrowed.join(" AND ");
    }
    Ok(job)
}

fn check(args: CheckArgs) -> anyhow::Result<Exit> {
    let job = Job::load(&args.job, &LoadOptions { allow_unpriced: true, ..LoadOptions::default() })?;
    let Some(rules) = crate::pipeline::postprocess::build(&job)? else {
        return Err(usage(format!("job file {} has no [postprocess] rules to try", args.job.display())));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
    let outcome = rules.process(&text);
    if args.json {
        print_json(&outcome)?;
    } else {
        print!("{}", rules.render_account(&text, &outcome));
    }
    // A run would reject this text: the exit status says so, for scripts.
    Ok(if outcome.rejections.is_empty() { Exit::Finished } else { Exit::Failures })
}

/// Prints a report for people on stdout (it is the command's output: `> file` keeps it); a
/// closed pipe is not an error.
fn print_text(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
}

/// Prints one JSON object on stdout; a closed pipe is not an error.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    json_line::disarm();
    let text = serde_json::to_string(value)?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
