//! A standalone fake OpenAI-compatible provider account with a requests-per-minute limit, for
//! the multi-worker benchmark (scripts/bench-workers.sh). It is the integration tests' fake
//! (tests/integration/support/{fake,limited}.rs), served on a fixed port:
//!
//!     cargo run --example fake_provider -- --port 18411 --rpm 600 --burst-s 1 --latency-ms 100-300
//!
//! Answers name each item's id and a digest of its fields; over the limit it answers 429 with
//! `retry-after`; every answer carries `x-ratelimit-*` headers. `GET /_stats` counts requests.

#[allow(dead_code)]
#[path = "../tests/integration/support/fake.rs"]
mod fake;
#[allow(dead_code)]
#[path = "../tests/integration/support/limited.rs"]
mod limited;

use std::time::Duration;

use limited::{AccountLimit, LimitedProvider};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: cannot read {v:?}")))
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = arg(&args, "--port", 18411);
    let rpm: f64 = arg(&args, "--rpm", 600.0);
    let burst: f64 = arg(&args, "--burst-s", 1.0);
    let latency: String = arg(&args, "--latency-ms", "100-300".to_string());
    let (low, high) = latency.split_once('-').unwrap_or((&latency, &latency));
    let latency_ms = (low.parse().expect("--latency-ms LOW-HIGH"), high.parse().expect("--latency-ms LOW-HIGH"));
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("port {port}: {e}"));
    let limit = AccountLimit { requests_per_minute: rpm, burst: Duration::from_secs_f64(burst), latency_ms };
    let provider = LimitedProvider::start_on(listener, limit).await;
    provider.mount_stats().await;
    eprintln!("fake provider at {} ({rpm} requests/min, latency {latency} ms)", provider.base_url());
    tokio::signal::ctrl_c().await.ok();
    let (answered, limited) = provider.counts();
    eprintln!("fake provider: {answered} answered, {limited} rate limited");
}
