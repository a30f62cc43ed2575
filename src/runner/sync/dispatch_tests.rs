//! The dispatcher's loop, driven to its end in paused tokio time against an in-memory store and
//! an in-process provider: every item goes out and comes back written exactly once, the budget
//! cap stops the run without reserving past it, and a shutdown ends the loop within the grace
//! period. No test sleeps on the wall clock: paused time advances only when every task waits.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::controller_for;
use super::dispatch::Dispatcher;
use crate::ident::Ident;
use crate::job::{Job, LoadOptions};
use crate::pipeline::pack::Packer;
use crate::pricing::Picos;
use crate::provider::ChatClient;
use crate::runner::context::RunContext;
use crate::runner::progress::Progress;
use crate::runner::session::Stop;
use crate::store::*;
use crate::tokens::TokenCounter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Leased,
    Done,
    Failed,
}

#[derive(Default)]
struct Inner {
    /// Item id → (state, lease token, attempts, tier).
    items: BTreeMap<String, (State, i64, u32, u32)>,
    next_token: i64,
    /// Reserved calls: id → estimate; settled calls leave it and add their cost to `spent`.
    reserved: HashMap<i64, Picos>,
    spent: Picos,
    next_call: i64,
    /// The most committed money ever seen (spent + reserved).
    peak_committed: Picos,
    /// How many times each item was claimed.
    claims: HashMap<String, u32>,
    /// Claims made after the run's shutdown token was cancelled.
    claims_after_cancel: u32,
}

/// The store the dispatcher talks to, in memory. A `std::sync::Mutex`: every method takes it
/// for a few map operations and never across an `.await`, so an async lock would only add
/// wake-ups (and the tests read it from outside the runtime's tasks too).
struct FakeStore {
    inner: Mutex<Inner>,
    /// Set by a test when it cancels the run, so claims made after it can be counted.
    cancelled: CancellationToken,
    /// Whether it plays a store several workers share a run on (PostgreSQL).
    shared: bool,
    /// The controller states earlier runs of the job saved, newest first.
    earlier_states: Vec<String>,
}

impl FakeStore {
    fn new(items: usize) -> Arc<FakeStore> {
        Self::with_sharing(items, false)
    }

    fn with_earlier_states(items: usize, earlier_states: Vec<String>) -> Arc<FakeStore> {
        let store = Self::with_sharing(items, false);
        let mut store = Arc::try_unwrap(store).ok().expect("not shared yet");
        store.earlier_states = earlier_states;
        Arc::new(store)
    }

    fn with_sharing(items: usize, shared: bool) -> Arc<FakeStore> {
        let inner = Inner {
            items: (1..=items).map(|i| (format!("{i:03}"), (State::Pending, 0, 0, 0))).collect(),
            ..Inner::default()
        };
        Arc::new(FakeStore { inner: Mutex::new(inner), cancelled: CancellationToken::new(), shared, earlier_states: Vec::new() })
    }

    fn counts(&self) -> ItemCounts {
        let inner = self.inner.lock().unwrap();
        let mut counts = ItemCounts::default();
        for (state, ..) in inner.items.values() {
            match state {
                State::Pending => counts.pending += 1,
                State::Leased => counts.leased += 1,
                State::Done => counts.done += 1,
                State::Failed => counts.failed += 1,
            }
        }
        counts
    }

    fn leased_under(inner: &Inner, lease: &Lease) -> bool {
        inner.items.get(&lease.item_id).is_some_and(|(s, token, ..)| *s == State::Leased && *token == lease.token)
    }
}

#[async_trait]
impl Store for FakeStore {
    fn backend(&self) -> &'static str {
        "memory"
    }
    fn shares_runs(&self) -> bool {
        self.shared
    }
    async fn migrate(&self) -> anyhow::Result<()> {
        Ok(())
    }
    async fn runner_tables_exist(&self) -> anyhow::Result<bool> {
        Ok(true)
    }
}

#[async_trait]
impl Source for FakeStore {
    async fn inspect(&self, _: &Tables) -> anyhow::Result<SourceInfo> {
        unimplemented!("the dispatcher never inspects the source")
    }
    fn pending_rows<'a>(&'a self, _: &'a Tables, _: Option<u64>) -> BoxStream<'a, anyhow::Result<Item>> {
        unimplemented!("only a dry run streams rows")
    }
    async fn describe(&self, _: &Ident) -> anyhow::Result<Vec<ColumnShape>> {
        unimplemented!("only `init` describes tables")
    }
}

#[async_trait]
impl Runs for FakeStore {
    async fn latest_run(&self, _: &str) -> anyhow::Result<Option<RunRecord>> {
        unimplemented!("the session finds the run, not the dispatcher")
    }
    async fn create_run(&self, _: &NewRun, _: &Tables) -> anyhow::Result<Created> {
        unimplemented!("the session creates the run")
    }
    async fn attach(&self, _: i64, _: &Worker, _: Duration, _: bool) -> anyhow::Result<Attach> {
        unimplemented!("the session attaches")
    }
    async fn heartbeat(&self, _: i64, _: &Worker, _: Duration) -> anyhow::Result<bool> {
        unimplemented!("the session's heartbeat task is not running here")
    }
    async fn recover(&self, _: i64) -> anyhow::Result<Recovered> {
        unimplemented!("recovery happens at attach")
    }
    async fn detach(&self, _: i64, _: &Worker) -> anyhow::Result<()> {
        unimplemented!("the session detaches")
    }
    async fn set_status(&self, _: i64, _: RunStatus, _: Option<&str>) -> anyhow::Result<RunStatus> {
        unimplemented!("the session sets the run's status")
    }
    async fn save_controller_state(&self, _: i64, _: &str) -> anyhow::Result<()> {
        Ok(())
    }
    async fn earlier_controller_states(&self, _: &str, _: i64, limit: u64) -> anyhow::Result<Vec<String>> {
        Ok(self.earlier_states.iter().take(limit as usize).cloned().collect())
    }
    async fn set_budget(&self, _: i64, _: Option<f64>) -> anyhow::Result<()> {
        unimplemented!("set on resume, before the dispatcher")
    }
    async fn set_limit(&self, _: &Tables, _: i64, _: u64) -> anyhow::Result<u64> {
        unimplemented!("set on resume, before the dispatcher")
    }
    async fn set_mode(&self, _: i64, _: &str) -> anyhow::Result<()> {
        unimplemented!("set on resume, before the dispatcher")
    }
}

#[async_trait]
impl Queue for FakeStore {
    async fn claim(&self, _: &Tables, _: i64, _: &Worker, max_items: usize, _: Duration) -> anyhow::Result<Claim> {
        let after_cancel = self.cancelled.is_cancelled();
        let mut inner = self.inner.lock().unwrap();
        let ids: Vec<String> =
            inner.items.iter().filter(|(_, (s, ..))| *s == State::Pending).map(|(id, _)| id.clone()).take(max_items.max(1)).collect();
        let mut claimed = Vec::new();
        for id in ids {
            inner.next_token += 1;
            let token = inner.next_token;
            let entry = inner.items.get_mut(&id).unwrap();
            entry.0 = State::Leased;
            entry.1 = token;
            let (attempts, tier) = (entry.2, entry.3);
            *inner.claims.entry(id.clone()).or_default() += 1;
            if after_cancel {
                inner.claims_after_cancel += 1;
            }
            let item = Item { id: id.clone(), fields: vec![("title".into(), json!(format!("title {id}")))] };
            claimed.push(Claimed { lease: Lease { item_id: id, token }, attempts, tier, item });
        }
        let leased = inner.items.values().filter(|(s, ..)| *s == State::Leased).count() as u64;
        Ok(Claim { items: claimed, next_ready_at: None, leased, vanished: 0 })
    }

    async fn claim_ids(&self, _: &Tables, _: i64, _: &Worker, _: &[String], _: Duration) -> anyhow::Result<Option<Vec<Claimed>>> {
        unimplemented!("only the replay of lost calls claims by id")
    }

    async fn release(&self, _: i64, leases: &[Lease]) -> anyhow::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        for lease in leases {
            if FakeStore::leased_under(&inner, lease) {
                inner.items.get_mut(&lease.item_id).unwrap().0 = State::Pending;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Ledger for FakeStore {
    async fn reserve_call(&self, call: &NewCall, cap: Option<Picos>) -> anyhow::Result<Option<i64>> {
        let mut inner = self.inner.lock().unwrap();
        let committed = inner.spent.0 + inner.reserved.values().map(|p| p.0).sum::<i64>();
        if cap.is_some_and(|cap| committed + call.estimated.0 > cap.0) {
            return Ok(None);
        }
        inner.next_call += 1;
        let id = inner.next_call;
        inner.reserved.insert(id, call.estimated);
        let committed = Picos(committed + call.estimated.0);
        if committed.0 > inner.peak_committed.0 {
            inner.peak_committed = committed;
        }
        Ok(Some(id))
    }

    async fn write_batch(&self, _: &Tables, batch: &BatchWrite) -> anyhow::Result<WriteReport> {
        let mut inner = self.inner.lock().unwrap();
        inner.reserved.remove(&batch.call_id);
        inner.spent = Picos(inner.spent.0 + batch.settle.cost.0);
        let mut report = WriteReport::default();
        for update in &batch.items {
            if !FakeStore::leased_under(&inner, &update.lease) {
                report.stale += 1;
                continue;
            }
            let entry = inner.items.get_mut(&update.lease.item_id).unwrap();
            entry.0 = match &update.change {
                ItemChange::Done { .. } => State::Done,
                ItemChange::Retry { attempts, tier, .. } => {
                    (entry.2, entry.3) = (*attempts, *tier);
                    State::Pending
                }
                ItemChange::Failed { .. } | ItemChange::Rejected { .. } => State::Failed,
            };
            report.written += 1;
        }
        Ok(report)
    }

    async fn spend(&self, _: i64) -> anyhow::Result<Spend> {
        let inner = self.inner.lock().unwrap();
        Ok(Spend { spent: inner.spent, reserved: Picos(inner.reserved.values().map(|p| p.0).sum()), lost: Picos::ZERO })
    }

    async fn lost_calls(&self, _: i64) -> anyhow::Result<Vec<LostCall>> {
        unimplemented!("only the replay of lost calls reads them")
    }
}

#[async_trait]
impl Cache for FakeStore {
    async fn cache_get(&self, _: &str) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    async fn cache_put(&self, _: &str, _: &str, _: &str, _: Duration) -> anyhow::Result<()> {
        Ok(())
    }
    async fn cache_drop(&self, _: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

#[async_trait]
impl Batches for FakeStore {
    async fn create_batch(&self, _: i64, _: &str) -> anyhow::Result<BatchRecord> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn update_batch(&self, _: &BatchRecord) -> anyhow::Result<()> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn batches(&self, _: i64) -> anyhow::Result<Vec<BatchRecord>> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn set_batch_input(&self, _: i64, _: Option<&[u8]>) -> anyhow::Result<()> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn batch_input(&self, _: i64) -> anyhow::Result<Option<Vec<u8>>> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn hold(&self, _: i64, _: &[Lease], _: &str) -> anyhow::Result<u64> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn held(&self, _: i64, _: &str) -> anyhow::Result<Vec<HeldItem>> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn calls_of(&self, _: i64, _: &str) -> anyhow::Result<Vec<OwnedCall>> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
    async fn note_batch(&self, _: i64, _: &BatchNote) -> anyhow::Result<bool> {
        unimplemented!("the synchronous engine makes no provider batches")
    }
}

#[async_trait]
impl Reports for FakeStore {
    async fn item_counts(&self, _: i64) -> anyhow::Result<ItemCounts> {
        Ok(self.counts())
    }
    async fn status(&self, _: &str, _: Option<i64>) -> anyhow::Result<Option<StatusReport>> {
        unimplemented!("`status` reads it, not the dispatcher")
    }
    async fn history(&self, _: &str, _: i64, _: Option<u64>) -> anyhow::Result<Vec<(RunRecord, Picos)>> {
        unimplemented!("`status` reads it, not the dispatcher")
    }
    async fn find_run(&self, _: &str, _: Option<i64>) -> anyhow::Result<Option<RunRecord>> {
        unimplemented!("`status` reads it, not the dispatcher")
    }
    async fn failures(&self, _: i64, _: Option<&str>, _: Option<u64>) -> anyhow::Result<Vec<FailureRow>> {
        unimplemented!("`report` reads them, not the dispatcher")
    }
    async fn calls(&self, _: i64) -> anyhow::Result<Vec<CallRow>> {
        unimplemented!("`report` reads them, not the dispatcher")
    }
    async fn output_tokens_per_item(&self, _: &str, _: &str) -> anyhow::Result<Option<f64>> {
        unimplemented!("the dry run reads it, not the dispatcher")
    }
    async fn latest_measure(&self, _: [&str; 2], _: &str) -> anyhow::Result<Option<Measured>> {
        unimplemented!("the dry run reads it, not the dispatcher")
    }
}

#[async_trait]
impl SharedRate for FakeStore {
    async fn take_rate(&self, _: &RateTake) -> anyhow::Result<Duration> {
        unimplemented!("a store that does not share runs is never asked for the shared rate")
    }
    async fn report_rate(&self, _: &str, _: &RateCaps, _: &RateReport) -> anyhow::Result<()> {
        unimplemented!("a store that does not share runs is never asked for the shared rate")
    }
}

/// A chat-completions endpoint on a local port: each request is answered, after `delay` of
/// (paused) time, with an answer for every id its response schema requires; `None` never
/// answers (calls stay in flight).
async fn provider(delay: Option<Duration>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                loop {
                    let Some(body) = read_request(&mut socket).await else { return };
                    let Some(delay) = delay else { return std::future::pending().await };
                    tokio::time::sleep(delay).await;
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    let ids = request["response_format"]["json_schema"]["schema"]["required"].as_array().cloned().unwrap_or_default();
                    let content: serde_json::Map<String, Value> =
                        ids.iter().map(|id| (id.as_str().unwrap().to_owned(), json!(format!("answer {}", id.as_str().unwrap())))).collect();
                    let answer = json!({
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "choices": [{ "index": 0, "message": { "role": "assistant", "content": Value::Object(content).to_string() }, "finish_reason": "stop" }],
                        "usage": { "prompt_tokens": 100, "completion_tokens": 10 * ids.len(), "total_tokens": 100 + 10 * ids.len() }
                    })
                    .to_string();
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", answer.len());
                    if socket.write_all(head.as_bytes()).await.is_err() || socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// One HTTP/1.1 request's body (by its content-length), or `None` when the client hung up.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    crate::provider::test_http::read_request(socket, &mut Vec::new()).await
}

/// A run's context over the fake store and the local provider, from a job file like a user's.
fn context(store: Arc<FakeStore>, base_url: &str, cap: Option<Picos>) -> (tempfile::TempDir, Arc<RunContext>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prompt.md"), "Answer each by id.\n{{items}}\n").unwrap();
    // The job names a database file, as a user's does; the fake store stands in for it.
    std::fs::write(dir.path().join("unused.db"), "").unwrap();
    let job_path = dir.path().join("job.toml");
    let job = format!(
        r#"name = "loop-test"

[source]
database = "sqlite://{db}"
table = "items"
id = "id"
columns = ["title"]
pending = "summary IS NULL"

[target]
column = "summary"

[prompt]
template = "prompt.md"

[model]
base_url = "{base_url}"
name = "fake-model"
structured_output = "json_schema"
max_output_tokens_per_item = 60
request_timeout_s = 30

[pricing.fake-model]
input = 0.15
output = 0.60

[limits]
items_per_request = {{ start = 5, min = 1, max = 10 }}
concurrency = {{ start = 4, min = 1, max = 8 }}
max_attempts = 4
grace_seconds = 3
"#,
        db = dir.path().join("unused.db").display(),
    );
    std::fs::write(&job_path, job).unwrap();
    let job = Job::load(&job_path, &LoadOptions::default()).unwrap();
    let chat = job.chat().unwrap().clone();
    let client = ChatClient::new(&chat.base_url, None, chat.request_timeout, chat.max_response_bytes).unwrap();
    let packer =
        Packer::new(&chat.template, chat.system.clone(), TokenCounter::new(&chat.encoding).unwrap(), chat.context_window, chat.max_tokens);
    let mut ctx = RunContext::new(&job, &chat, store, 1, client, packer, None);
    ctx.cap = cap;
    (dir, Arc::new(ctx))
}

/// What a run of the loop sent to the writer, item id → how many times.
struct Written {
    per_item: Mutex<HashMap<String, u32>>,
    batches: AtomicUsize,
}

/// The loop over `items` items until it stops, with the writer played by a task that applies
/// each write to the store and counts it; `cancel_at` cancels the run after that much time.
async fn run(store: Arc<FakeStore>, delay: Option<Duration>, cap: Option<Picos>, cancel_at: Option<Duration>) -> (Stop, Arc<Written>, Arc<RunContext>) {
    let url = provider(delay).await;
    let (_dir, ctx) = context(store.clone(), &url, cap);
    let run = RunRecord {
        id: 1,
        job: "loop-test".into(),
        status: RunStatus::Running,
        target: String::new(),
        total_items: 0,
        max_usd: None,
        created_at: 0,
        updated_at: 0,
        finished_at: None,
        controller_state: None,
        last_error: None,
        mode: None,
        limit: None,
    };
    let controller = controller_for(&ctx, &run, None).unwrap();
    let (tx, mut rx) = mpsc::channel::<BatchWrite>(crate::runner::writer::WRITE_QUEUE);
    let written = Arc::new(Notify::new());
    let counts = store.counts();
    let progress = Arc::new(Progress::new(counts.total(), 0, 0, 0, Picos::ZERO, cap));
    progress.queued.store(counts.pending as usize, Ordering::Relaxed);
    let log = Arc::new(Written { per_item: Mutex::new(HashMap::new()), batches: AtomicUsize::new(0) });
    let writer = {
        let (store, ctx, written, log) = (store.clone(), ctx.clone(), written.clone(), log.clone());
        tokio::spawn(async move {
            while let Some(write) = rx.recv().await {
                store.write_batch(&ctx.tables, &write).await.unwrap();
                log.batches.fetch_add(1, Ordering::Relaxed);
                let mut per_item = log.per_item.lock().unwrap();
                for update in write.items.iter().filter(|u| matches!(u.change, ItemChange::Done { .. })) {
                    *per_item.entry(update.lease.item_id.clone()).or_default() += 1;
                }
                drop(per_item);
                written.notify_waiters();
            }
        })
    };
    let shutdown = CancellationToken::new();
    if let Some(after) = cancel_at {
        let (shutdown, cancelled) = (shutdown.clone(), store.cancelled.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            cancelled.cancel();
            shutdown.cancel();
        });
    }
    let mut dispatcher = Dispatcher::new(ctx.clone(), controller, tx, written, progress);
    let stop = dispatcher.run(&shutdown).await.unwrap();
    drop(dispatcher);
    writer.await.unwrap();
    (stop, log, ctx)
}

#[tokio::test(start_paused = true)]
async fn every_item_is_claimed_answered_and_written_once() {
    let store = FakeStore::new(40);
    let (stop, written, _ctx) = run(store.clone(), Some(Duration::from_millis(300)), None, None).await;
    assert_eq!(stop, Stop::Drained);
    let inner = store.inner.lock().unwrap();
    assert_eq!(inner.claims.len(), 40);
    assert!(inner.claims.values().all(|&n| n == 1), "claimed more than once: {:?}", inner.claims);
    let per_item = written.per_item.lock().unwrap();
    assert_eq!(per_item.len(), 40);
    assert!(per_item.values().all(|&n| n == 1), "written more than once: {per_item:?}");
    assert!(inner.items.values().all(|(s, ..)| *s == State::Done));
    assert!(inner.reserved.is_empty(), "every reservation settled");
}

#[tokio::test(start_paused = true)]
async fn the_budget_cap_stops_the_run_without_reserving_past_it() {
    let store = FakeStore::new(200);
    let cap = Picos::from_usd(0.0005);
    let (stop, written, _ctx) = run(store.clone(), Some(Duration::from_millis(300)), Some(cap), None).await;
    assert_eq!(stop, Stop::Budget);
    let inner = store.inner.lock().unwrap();
    assert!(inner.peak_committed.0 <= cap.0, "reserved {:?} past the cap {cap:?}", inner.peak_committed);
    assert!(inner.reserved.is_empty(), "every reservation settled");
    drop(inner);
    let counts = store.counts();
    assert!(counts.done > 0 && counts.pending > 0, "{counts:?}");
    assert_eq!(counts.leased, 0, "refused claims go back to the queue");
    assert_eq!(written.per_item.lock().unwrap().len() as u64, counts.done);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_stops_claiming_and_ends_within_the_grace_period() {
    let store = FakeStore::new(40);
    let started = tokio::time::Instant::now();
    // The provider never answers: calls are in flight when the run is cancelled at 2 s.
    let (stop, written, ctx) = run(store.clone(), None, None, Some(Duration::from_secs(2))).await;
    assert_eq!(stop, Stop::Interrupted);
    assert!(started.elapsed() <= Duration::from_secs(2) + ctx.grace, "ended after {:?}", started.elapsed());
    assert_eq!(ctx.grace, Duration::from_secs(3));
    let inner = store.inner.lock().unwrap();
    assert_eq!(inner.claims_after_cancel, 0, "claimed after the shutdown");
    assert_eq!(written.batches.load(Ordering::Relaxed), 0, "abandoned calls write nothing");
    drop(inner);
    // The abandoned calls' items stay leased (their lease returns them); nothing else is taken.
    let counts = store.counts();
    assert!(counts.leased > 0 && counts.done == 0, "{counts:?}");
}

/// A fresh controller's saved state with `settled` requests in flight found between two
/// measured levels, naming no server or model (as states saved before they were named).
fn state_at(settled: u32) -> backfill_controller::ControllerState {
    use backfill_controller::{Controller, ControllerConfig, DelayState};
    let mut state = Controller::new(ControllerConfig::with_defaults(), Duration::ZERO).unwrap().snapshot();
    state.delay = Some(DelayState { settled, bracketed: true, slots: None });
    state
}

/// An interrupted run of 10 items whose controller saved `state`.
fn interrupted_run(state: &str) -> RunRecord {
    RunRecord {
        id: 1,
        job: "loop-test".into(),
        status: RunStatus::Interrupted,
        target: String::new(),
        total_items: 10,
        max_usd: None,
        created_at: 0,
        updated_at: 0,
        finished_at: None,
        controller_state: Some(state.into()),
        last_error: None,
        mode: None,
        limit: None,
    }
}

/// A saved state that cannot be read (a damaged row, another format) costs only its head
/// start: the run goes on with a fresh controller.
#[test]
fn a_saved_state_that_cannot_be_read_starts_the_controller_afresh() {
    let (_dir, ctx) = context(FakeStore::new(10), "http://127.0.0.1:9/v1", None);
    for saved in ["{not json", r#"{"version":1,"delay":{}}"#] {
        let run = interrupted_run(saved);
        let controller = controller_for(&ctx, &run, None).unwrap();
        assert_eq!(controller.status().delay_limit, Some(4), "{saved}");
        assert_eq!(controller.counts().requests_sent, 0, "{saved}");
    }
}

/// A resumed run goes on at the requests in flight it had found; a worker joining a run on a
/// store that several workers share does not take the saved level (one worker's share of the
/// server, whichever saved last) and starts as a fresh run does.
#[test]
fn the_saved_level_of_requests_in_flight_is_taken_only_where_a_run_has_one_worker() {
    let state = state_at(6);
    for (shared, level) in [(false, 6), (true, 4)] {
        let (_dir, ctx) = context(FakeStore::with_sharing(10, shared), "http://127.0.0.1:9/v1", None);
        let run = interrupted_run(&serde_json::to_string(&state).unwrap());
        let controller = controller_for(&ctx, &run, None).unwrap();
        assert_eq!(controller.status().delay_limit, Some(level), "shared: {shared}");
    }
}

/// A saved level counts only on the server and model it was found on: the state names them
/// (the job's base URL without credentials or query, and the model), and a run whose job now
/// names another starts as a fresh run does; a state saved before they were named keeps its
/// level.
#[test]
fn a_resumed_run_takes_its_saved_level_only_on_the_server_it_was_found_on() {
    let mut state = state_at(6);
    let (_dir, ctx) = context(FakeStore::new(10), "http://127.0.0.1:9/v1", None);
    let model = ctx.chat.name.clone();
    for (server, model, level) in [
        (Some("http://127.0.0.1:9/v1"), Some(model.as_str()), 6),
        (Some("http://127.0.0.1:10/v1"), Some(model.as_str()), 4),
        (Some("http://127.0.0.1:9/v1"), Some("another-model"), 4),
        (None, None, 6),
    ] {
        state.server = server.map(str::to_owned);
        state.model = model.map(str::to_owned);
        let run = interrupted_run(&serde_json::to_string(&state).unwrap());
        let controller = controller_for(&ctx, &run, None).unwrap();
        assert_eq!(controller.status().delay_limit, Some(level), "saved on {server:?}, {model:?}");
    }
}

/// A run that has not saved a state of its own (`controller_state` empty).
fn fresh_run() -> RunRecord {
    RunRecord { controller_state: None, status: RunStatus::Running, id: 5, ..interrupted_run("") }
}

/// A saved state at `settled` requests in flight, found on `server` with `model`.
fn state_found(settled: u32, server: &str, model: &str) -> backfill_controller::ControllerState {
    let mut state = state_at(settled);
    state.server = Some(server.into());
    state.model = Some(model.into());
    state
}

/// A fresh run starts at the level the job's last run settled on, when that run named the same
/// server and model and the store gives each run one worker; elsewhere at the job's start.
#[test]
fn a_fresh_run_starts_at_the_level_the_jobs_last_run_on_the_same_server_settled_on() {
    let (_dir, ctx) = context(FakeStore::new(10), "http://127.0.0.1:9/v1", None);
    let model = ctx.chat.name.clone();
    for (shared, server, model, level) in [
        (false, "http://127.0.0.1:9/v1", model.as_str(), 6),
        (false, "http://127.0.0.1:10/v1", model.as_str(), 4),
        (false, "http://127.0.0.1:9/v1", "another-model", 4),
        (true, "http://127.0.0.1:9/v1", model.as_str(), 4),
    ] {
        let (_dir, ctx) = context(FakeStore::with_sharing(10, shared), "http://127.0.0.1:9/v1", None);
        let controller = controller_for(&ctx, &fresh_run(), Some(state_found(6, server, model))).unwrap();
        assert_eq!(controller.status().delay_limit, Some(level), "earlier run on {server}, {model}, shared: {shared}");
    }
}

/// The earlier state a fresh run takes is the newest one saved on this server and model (a
/// later run elsewhere, or a state that cannot be read, is passed over); a run with a state of
/// its own, or on a store whose runs several workers share, takes none.
#[tokio::test]
async fn the_earlier_state_is_the_newest_saved_on_this_server_and_model() {
    let (_dir, probe) = context(FakeStore::new(1), "http://127.0.0.1:9/v1", None);
    let model = probe.chat.name.clone();
    let json = |state: backfill_controller::ControllerState| serde_json::to_string(&state).unwrap();
    let states = vec![
        json(state_found(9, "http://127.0.0.1:10/v1", &model)),
        "{not json".to_owned(),
        json(state_found(7, "http://127.0.0.1:9/v1", "another-model")),
        json(state_found(6, "http://127.0.0.1:9/v1", &model)),
        json(state_found(3, "http://127.0.0.1:9/v1", &model)),
    ];
    let (_dir, ctx) = context(FakeStore::with_earlier_states(10, states.clone()), "http://127.0.0.1:9/v1", None);
    let earlier = super::earlier_state(&ctx, &fresh_run()).await.expect("a state on this server");
    assert_eq!(earlier.delay.map(|delay| delay.settled), Some(6));
    assert_eq!(super::earlier_state(&ctx, &interrupted_run(&states[3])).await, None, "a resumed run has its own");
    let (_dir, shared) = context(FakeStore::with_sharing(10, true), "http://127.0.0.1:9/v1", None);
    assert_eq!(super::earlier_state(&shared, &fresh_run()).await, None);
}
