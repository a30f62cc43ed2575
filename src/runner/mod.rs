//! A run, end to end: the job's checks that need neither the database nor the network, the
//! run found or created and attached (`lifecycle.rs`), the harness started (`session.rs`), and
//! one engine chosen — synchronous calls (`sync/`), provider batches (`batch/`) or a local
//! model (`local/`) — to work the queue off until it drains or something stops the run.

mod batch;
pub mod context;
mod lifecycle;
mod local;
pub mod policy;
pub mod progress;
mod session;
mod signals;
pub mod summary;
mod sync;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub use context::RunContext;
pub use session::Stop;
pub use signals::install as install_signals;
pub use summary::Summary;
pub(crate) use sync::error_outcome;

use crate::exit::Exit;
use crate::job::{ChatModel, Job, Mode, Processor};
use crate::pipeline::pack::Packer;
use crate::pipeline::postprocess::OutputCheck;
use crate::provider::{ChatClient, GaugeReading, ServerProps};
use crate::store::Store;
use crate::tokens::TokenCounter;
use session::Session;

/// How `run` was asked to go.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub resume: bool,
    pub limit: Option<u64>,
    /// No progress output (for `--json` consumers that also read stderr, and tests).
    pub quiet: bool,
    /// Batch mode: how long to wait for the provider's batches (`None`: until they end).
    pub wait: Option<Duration>,
    /// Batch mode: after this run age, finish through the synchronous API.
    pub finish_sync_after: Option<Duration>,
    /// `--max-usd` as given (a resumed run keeps its own cap without it).
    pub max_usd: Option<f64>,
    /// `--batch-api` was given (moves a resumed synchronous run to the batch API).
    pub batch_api: bool,
    /// `--metrics-addr`: serve Prometheus metrics there while the run goes.
    pub metrics_addr: Option<String>,
    /// `--metrics-file`: write the same metrics there when the run ends.
    pub metrics_file: Option<std::path::PathBuf>,
}

/// How a run ended: the summary (`None`: `--resume` found nothing pending and started no run)
/// and the exit code.
#[derive(Debug)]
pub struct RunOutcome {
    pub summary: Option<Summary>,
    pub exit: Exit,
}

impl RunOutcome {
    fn nothing_pending() -> RunOutcome {
        RunOutcome { summary: None, exit: Exit::Finished }
    }
}

/// Runs a job. The engine is chosen here, once: by the processor, and for a chat job by the
/// run's mode (which a resume keeps).
pub async fn run(job: &Job, options: &RunOptions, shutdown: CancellationToken) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    // Everything that can be checked without the database and the network comes first: the
    // key variable and the post-processing rules; a bad model or tokenizer.
    let ready = match &job.processor {
        Processor::Chat(chat) => {
            let api_key = chat.api_key()?;
            let check: Option<Arc<dyn OutputCheck>> = match crate::pipeline::postprocess::build(job)? {
                Some(p) => Some(p),
                None => None,
            };
            if api_key.is_none() {
                tracing::info!("{} is not set: calling {} without an API key", chat.api_key_env, crate::secret::redact_url(&chat.base_url));
            }
            Ready::Chat(check, ChatClient::new(&chat.base_url, api_key, chat.request_timeout, chat.max_response_bytes)?)
        }
        Processor::Onnx(model) => Ready::Local(crate::local_model::load(model).await?),
    };
    // What a self-hosted server says of itself (llama.cpp's slots) and whether it shows its
    // load in gauges (vLLM's, llama.cpp's, SGLang's, TGI's `GET /metrics`, SGLang's
    // `GET /v1/loads`), asked together within seconds, before the run is attached and its
    // lease starts running.
    let shown = match &ready {
        Ready::Chat(_, client) => {
            let (props, gauges) = tokio::join!(client.server_props(), client.server_gauges());
            Shown { props, gauges }
        }
        Ready::Local(_) => Shown { props: None, gauges: None },
    };
    let exporter = crate::metrics::prepare(options.metrics_addr.as_deref(), options.metrics_file.as_deref()).await?;
    let Some(attached) = lifecycle::attach(job, options).await? else {
        return Ok(RunOutcome::nothing_pending());
    };
    // The run's own cap and mode, which a resume keeps.
    let job = &attached.job;
    match (ready, &job.processor) {
        (Ready::Chat(check, client), Processor::Chat(chat)) => {
            if chat.mode != Mode::Batch && (options.wait.is_some() || options.finish_sync_after.is_some()) {
                tracing::warn!(
                    "run {}: --wait and --finish-sync-after are ignored, the run is synchronous (--batch-api moves it to batches)",
                    attached.run.id
                );
            }
            let ctx = Arc::new(context_for(job, chat, attached.store.clone(), attached.run.id, check, client, shown)?);
            let earlier = sync::earlier_state(&ctx, &attached.run).await;
            let controller = sync::controller_for(&ctx, &attached.run, earlier)?;
            let mode = chat.mode;
            let session = Session::open(attached, ctx.cap, options.quiet, started, exporter).await?;
            let engine = sync::SyncEngine::new(ctx.clone(), controller, &session);
            match mode {
                Mode::Batch => session.drive(batch::BatchEngine::new(ctx, engine, options), shutdown).await,
                Mode::Sync => session.drive(engine, shutdown).await,
            }
        }
        (Ready::Local(processor), Processor::Onnx(model)) => {
            let model = model.clone();
            let session = Session::open(attached, None, options.quiet, started, exporter).await?;
            let engine = local::LocalEngine::new(processor, &model, &session);
            session.drive(engine, shutdown).await
        }
        _ => unreachable!("a run keeps its job's processor"),
    }
}

/// What a self-hosted server showed of itself before the run.
struct Shown {
    /// Its slots and their context (llama.cpp's `GET /props`).
    props: Option<ServerProps>,
    /// Its gauges of requests running and waiting (`GET /metrics`, `GET /v1/loads`).
    gauges: Option<GaugeReading>,
}

/// What was checked before the run is touched, by processor.
enum Ready {
    /// The post-processing rules and the provider's client.
    Chat(Option<Arc<dyn OutputCheck>>, ChatClient),
    Local(Arc<backfill_onnx::OnnxProcessor>),
}

fn context_for(
    job: &Job,
    chat: &ChatModel,
    store: Arc<dyn Store>,
    run_id: i64,
    check: Option<Arc<dyn OutputCheck>>,
    client: ChatClient,
    shown: Shown,
) -> anyhow::Result<RunContext> {
    // A self-hosted server that says how many requests it works on at once, and how much
    // context each holds, is taken at its word (requests to a provider's batch API go
    // elsewhere).
    let server = shown.props.filter(|_| chat.mode == Mode::Sync);
    let mut chat = chat.clone();
    if let Some(server) = server {
        announce_server(&chat, &job.limits, server);
        if let Some(slot_context) = server.slot_context.filter(|n| *n < chat.context_window) {
            chat.context_window = slot_context;
            chat.max_tokens = chat.max_tokens.map(|max| max.min(slot_context));
        }
    }
    let chat = &chat;
    let packer = Packer::new(
        &chat.template,
        chat.system.clone(),
        TokenCounter::new(&chat.encoding)?,
        chat.context_window,
        chat.max_tokens,
    );
    let mut ctx = RunContext::new(job, chat, store, run_id, client, packer, check);
    ctx.server = server;
    ctx.gauges = shown.gauges.filter(|_| chat.mode == Mode::Sync);
    if let Some(gauges) = ctx.gauges {
        tracing::info!(
            "the server at {} shows the requests it runs and those waiting at {} ({}'s {}): the run reads them every second, doubles its requests in flight while none waits, and holds at what the server ran once requests wait",
            crate::secret::redact_url(&chat.base_url),
            gauges.source.request(),
            gauges.server,
            gauges.waiting_gauge,
        );
    }
    Ok(ctx)
}

/// Says what the server announced and what the run makes of it.
fn announce_server(chat: &ChatModel, limits: &crate::job::Limits, server: ServerProps) {
    let concurrency = limits.concurrency;
    let start = server.slots.clamp(concurrency.min, concurrency.max);
    let within = if start == server.slots {
        String::new()
    } else {
        format!(" ([limits] concurrency allows {}..{})", concurrency.min, concurrency.max)
    };
    let context = match server.slot_context {
        Some(n) if n < chat.context_window => format!(
            "; each slot holds {n} tokens of context, fewer than model.context_window ({}), so requests are packed to fit {n}",
            chat.context_window
        ),
        Some(n) => format!(" of {n} tokens of context each"),
        None => String::new(),
    };
    tracing::info!(
        "the server at {} works on {} requests at once (GET /props){context}: the run starts at {start} in flight{within} and measures from there",
        crate::secret::redact_url(&chat.base_url),
        server.slots,
    );
}
