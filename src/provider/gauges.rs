//! What a self-hosted server shows of its load while the run goes on: at `GET /metrics`, in
//! Prometheus's text format, vLLM counts the requests it runs and those waiting for a slot
//! (`vllm:num_requests_running`, `vllm:num_requests_waiting`), llama.cpp's `llama-server` does
//! when started with `--metrics` (`llamacpp:requests_processing`, `llamacpp:requests_deferred`),
//! SGLang does when started with `--enable-metrics` (`sglang:num_running_reqs`,
//! `sglang:num_queue_reqs`) and Hugging Face's text-generation-inference does too
//! (`tgi_batch_current_size`, `tgi_queue_size`). SGLang also answers `GET /v1/loads` without
//! any flag, in JSON, with the same counts for each of its data-parallel ranks
//! (`num_running_reqs`, `num_waiting_reqs`). Every client's requests are counted, not only
//! ours. Servers without such gauges (Ollama, hosted APIs, most proxies) answer 404 or
//! something else, and the run goes on without them.

use std::collections::HashMap;
use std::time::Duration;

use backfill_controller::ServerQueue;
use serde::Deserialize;

use super::ChatClient;

/// How long one reading may take: the server answers its gauges at once or is not read.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of the answer read (vLLM's histograms make it tens of kilobytes).
const GAUGES_MAX_BYTES: u64 = 4 << 20;

/// The gauges a server names at `GET /metrics`.
struct KnownGauges {
    server: &'static str,
    running: &'static str,
    waiting: &'static str,
    /// Labels that tell apart copies of one figure: SGLang's tensor- and pipeline-parallel
    /// ranks each report their group's counts (with `--enable-metrics-for-all-schedulers`).
    /// Samples whose other labels are the same are one part of the server, of which the
    /// largest is taken; the parts add up (vLLM's engines, SGLang's data-parallel ranks).
    copies: &'static [&'static str],
}

const KNOWN_GAUGES: [KnownGauges; 4] = [
    KnownGauges {
        server: "vLLM",
        running: "vllm:num_requests_running",
        waiting: "vllm:num_requests_waiting",
        copies: &[],
    },
    KnownGauges {
        server: "llama.cpp",
        running: "llamacpp:requests_processing",
        waiting: "llamacpp:requests_deferred",
        copies: &[],
    },
    KnownGauges {
        server: "SGLang",
        running: "sglang:num_running_reqs",
        waiting: "sglang:num_queue_reqs",
        copies: &["tp_rank", "pp_rank", "moe_ep_rank"],
    },
    KnownGauges {
        server: "text-generation-inference",
        running: "tgi_batch_current_size",
        waiting: "tgi_queue_size",
        copies: &[],
    },
];

/// Where a server shows its gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GaugeSource {
    /// `GET /metrics`, Prometheus's text format.
    Metrics,
    /// SGLang's `GET /v1/loads`, JSON.
    Loads,
}

impl GaugeSource {
    /// The path beside the API root.
    fn path(self) -> &'static str {
        match self {
            GaugeSource::Metrics => "metrics",
            GaugeSource::Loads => "v1/loads?include=core",
        }
    }

    /// The request, as a log line names it.
    pub fn request(self) -> &'static str {
        match self {
            GaugeSource::Metrics => "GET /metrics",
            GaugeSource::Loads => "GET /v1/loads",
        }
    }

    fn parse(self, body: &str) -> Option<GaugeReading> {
        match self {
            GaugeSource::Metrics => parse_gauges(body),
            GaugeSource::Loads => parse_loads(body),
        }
    }
}

/// One reading of the server's gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaugeReading {
    pub queue: ServerQueue,
    /// The server whose gauges they are, the name of its waiting gauge, and where they are.
    pub server: &'static str,
    pub waiting_gauge: &'static str,
    pub source: GaugeSource,
}

/// The end of a quoted label value that starts `text` after its opening quote: the index of
/// the closing quote (backslash escapes skipped).
fn closing_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    text.char_indices().find_map(|(at, c)| match c {
        _ if escaped => {
            escaped = false;
            None
        }
        '\\' => {
            escaped = true;
            None
        }
        '"' => Some(at),
        _ => None,
    })
}

/// The labels of a sample after its `{`: the `(name, value)` pairs (values as written,
/// escapes kept: only compared, never shown) and what follows the closing `}`. Values are
/// quoted and may hold braces, commas and spaces.
fn labels(mut text: &str) -> Option<(Vec<(&str, &str)>, &str)> {
    let mut pairs = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ', '\t']);
        if let Some(rest) = text.strip_prefix('}') {
            return Some((pairs, rest));
        }
        let (name, after) = text.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let end = closing_quote(after)?;
        pairs.push((name.trim(), &after[..end]));
        text = &after[end + 1..];
    }
}

/// One sample line (`name{labels} value [timestamp]`) of the metric `name`: its labels and
/// its value.
fn sample<'a>(line: &'a str, name: &str) -> Option<(Vec<(&'a str, &'a str)>, f64)> {
    let rest = line.strip_prefix(name)?;
    let (pairs, rest) = if let Some(after) = rest.strip_prefix('{') {
        labels(after)?
    } else if rest.starts_with([' ', '\t']) {
        (Vec::new(), rest)
    } else {
        // Another metric whose name starts with this one's.
        return None;
    };
    Some((pairs, rest.split_whitespace().next()?.parse::<f64>().ok()?))
}

/// A gauge's value over the server's parts: samples whose labels other than `copies` are the
/// same count once (the largest), the rest add up. `None` when the body holds no sample of
/// it, or one that is not a count.
fn gauge_total(body: &str, name: &str, copies: &[&str]) -> Option<f64> {
    let mut parts: HashMap<Vec<(&str, &str)>, f64> = HashMap::new();
    for line in body.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let Some((mut pairs, value)) = sample(line, name) else { continue };
        if !value.is_finite() || value < 0.0 {
            return None;
        }
        pairs.retain(|(label, _)| !copies.contains(label));
        pairs.sort_unstable();
        let most = parts.entry(pairs).or_insert(0.0);
        *most = most.max(value);
    }
    (!parts.is_empty()).then(|| parts.values().sum())
}

fn count(value: f64) -> u32 {
    value.round().min(f64::from(u32::MAX)) as u32
}

/// Reads a `GET /metrics` body: the first known server whose running and waiting gauges are
/// both there.
pub fn parse_gauges(body: &str) -> Option<GaugeReading> {
    KNOWN_GAUGES.iter().find_map(|known| {
        let running = gauge_total(body, known.running, known.copies)?;
        let waiting = gauge_total(body, known.waiting, known.copies)?;
        Some(GaugeReading {
            queue: ServerQueue { running: count(running), waiting: count(waiting) },
            server: known.server,
            waiting_gauge: known.waiting,
            source: GaugeSource::Metrics,
        })
    })
}

#[derive(Deserialize)]
struct LoadsBody {
    loads: Vec<RankLoad>,
}

/// One data-parallel rank's load. SGLang may leave out a count that is zero; the rank's
/// capacity (`max_total_num_tokens`, `max_running_requests`) is never zero, and its presence
/// tells SGLang's own answer from another server's `loads` (its router's, say).
#[derive(Deserialize)]
struct RankLoad {
    #[serde(default)]
    num_running_reqs: u64,
    #[serde(default)]
    num_waiting_reqs: u64,
    max_total_num_tokens: Option<u64>,
    max_running_requests: Option<u64>,
}

/// Reads SGLang's `GET /v1/loads` body: the requests running and waiting, summed over its
/// data-parallel ranks; `None` unless every rank is one of SGLang's.
pub fn parse_loads(body: &str) -> Option<GaugeReading> {
    let body: LoadsBody = serde_json::from_str(body).ok()?;
    let sglangs = |rank: &RankLoad| rank.max_total_num_tokens.or(rank.max_running_requests).is_some_and(|most| most > 0);
    if body.loads.is_empty() || !body.loads.iter().all(sglangs) {
        return None;
    }
    let sum = |of: fn(&RankLoad) -> u64| count(body.loads.iter().map(|rank| of(rank) as f64).sum());
    Some(GaugeReading {
        queue: ServerQueue { running: sum(|rank| rank.num_running_reqs), waiting: sum(|rank| rank.num_waiting_reqs) },
        server: "SGLang",
        waiting_gauge: "num_waiting_reqs",
        source: GaugeSource::Loads,
    })
}

impl ChatClient {
    /// Looks for the server's gauges before the run: SGLang's `GET /v1/loads` and
    /// `GET /metrics`, asked together, each within two seconds; the first is taken when both
    /// answer (SGLang's `/metrics` gauges are only refreshed every few dozen steps).
    pub async fn server_gauges(&self) -> Option<GaugeReading> {
        let (loads, metrics) = tokio::join!(self.read_gauges(GaugeSource::Loads), self.read_gauges(GaugeSource::Metrics));
        loads.or(metrics)
    }

    /// Reads the server's gauges once where it shows them (with the job's key), within two
    /// seconds; any failure is `None`.
    pub async fn read_gauges(&self, source: GaugeSource) -> Option<GaugeReading> {
        let body = self.get_beside_the_root(source.path(), GAUGES_MAX_BYTES, GAUGES_TIMEOUT).await?;
        source.parse(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(running: u32, waiting: u32) -> ServerQueue {
        ServerQueue { running, waiting }
    }

    #[test]
    fn vllms_gauges_add_up_over_its_engines() {
        let body = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen/Qwen2.5-1.5B-Instruct"} 12.0
vllm:num_requests_running{engine="1",model_name="Qwen/Qwen2.5-1.5B-Instruct"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen/Qwen2.5-1.5B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="Qwen/Qwen2.5-1.5B-Instruct"} 0.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99.0
vllm:kv_cache_usage_perc{engine="0",model_name="Qwen/Qwen2.5-1.5B-Instruct"} 0.42
"#;
        let reading = parse_gauges(body).expect("vLLM's gauges");
        assert_eq!(reading.queue, queue(16, 3));
        assert_eq!(reading.server, "vLLM");
        // Series told apart by any label add up (two models behind one address, say).
        let body = "vllm:num_requests_running{model_name=\"a\"} 4\nvllm:num_requests_running{model_name=\"b\"} 4\nvllm:num_requests_waiting{model_name=\"a\"} 1\nvllm:num_requests_waiting{model_name=\"b\"} 2\n";
        assert_eq!(parse_gauges(body).map(|r| r.queue), Some(queue(8, 3)));
    }

    #[test]
    fn llama_cpps_and_tgis_gauges_are_read() {
        let llama = "# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\n# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 5\n";
        assert_eq!(parse_gauges(llama).map(|r| (r.queue, r.server)), Some((queue(2, 5), "llama.cpp")));
        let tgi = "tgi_queue_size 7\ntgi_batch_current_size 32\ntgi_batch_current_max_tokens 20480\n";
        assert_eq!(parse_gauges(tgi).map(|r| r.queue), Some(queue(32, 7)));
    }

    #[test]
    fn sglangs_gauges_add_up_over_data_parallel_ranks_and_count_tensor_parallel_ranks_once() {
        // Two data-parallel ranks, each a group of two tensor-parallel ranks that report the
        // same figures (as with `--enable-metrics-for-all-schedulers`).
        let body = r#"# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 24.0
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="1"} 24.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 20.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="1"} 20.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="1"} 3.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 0.0
sglang:num_queue_reqs{dp_rank="1",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="1"} 0.0
sglang:num_grammar_queue_reqs{dp_rank="0",model_name="qwen"} 9.0
"#;
        let reading = parse_gauges(body).expect("SGLang's gauges");
        assert_eq!((reading.queue, reading.server, reading.source), (queue(44, 3), "SGLang", GaugeSource::Metrics));
        // One rank, its figures once per tensor-parallel rank, no data-parallel label.
        let body = "sglang:num_running_reqs{model_name=\"m\",tp_rank=\"0\"} 8\nsglang:num_running_reqs{model_name=\"m\",tp_rank=\"1\"} 8\nsglang:num_queue_reqs{model_name=\"m\",tp_rank=\"0\"} 2\nsglang:num_queue_reqs{model_name=\"m\",tp_rank=\"1\"} 2\n";
        assert_eq!(parse_gauges(body).map(|r| r.queue), Some(queue(8, 2)));
    }

    #[test]
    fn sglangs_loads_add_up_over_its_ranks() {
        let body = r#"{"timestamp":"2026-12-07T10:00:00+00:00","version":"0.5.9","accelerator":null,"num_accelerators":1,
            "loads":[{"dp_rank":0,"num_running_reqs":12,"num_waiting_reqs":5,"num_used_tokens":9000,"max_running_requests":48,"token_usage":0.4},
                     {"dp_rank":1,"num_running_reqs":10,"num_waiting_reqs":0,"max_running_requests":48}]}"#;
        let reading = parse_loads(body).expect("SGLang's loads");
        assert_eq!((reading.queue, reading.server, reading.source), (queue(22, 5), "SGLang", GaugeSource::Loads));
        // Counts that are zero may be left out.
        let idle = r#"{"loads":[{"max_total_num_tokens":500000,"max_running_requests":48}]}"#;
        assert_eq!(parse_loads(idle).map(|r| r.queue), Some(queue(0, 0)));
        // Counts too large to add up do not overflow.
        let huge = format!(r#"{{"loads":[{{"num_running_reqs":{m},"num_waiting_reqs":{m},"max_running_requests":1}},{{"num_running_reqs":{m},"max_running_requests":1}}]}}"#, m = u64::MAX);
        assert_eq!(parse_loads(&huge).map(|r| r.queue), Some(queue(u32::MAX, u32::MAX)));
        for body in [
            "",
            "404 page not found",
            r#"{"detail":"Not Found"}"#,
            r#"{"loads":[]}"#,
            r#"{"loads":[{"worker":"http://10.0.0.2:30000","load":0}]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":3,"num_waiting_reqs":0}]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":3,"max_running_requests":0}]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":-1,"num_waiting_reqs":0,"max_running_requests":8}]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":1.5,"num_waiting_reqs":0,"max_running_requests":8}]}"#,
        ] {
            assert_eq!(parse_loads(body), None, "{body}");
        }
    }

    #[test]
    fn labels_are_read_whatever_their_values_hold() {
        let (pairs, rest) = labels(r#"model_name="a,b=\"c\"}", engine="1",dp_rank = "2"} 7 1700000000000"#).expect("labels");
        assert_eq!(pairs, [("model_name", r#"a,b=\"c\"}"#), ("engine", "1"), ("dp_rank", "2")]);
        assert_eq!(rest, " 7 1700000000000");
        assert_eq!(labels("} 1"), Some((vec![], " 1")));
        for broken in [r#"a="1" 3"#, r#"a=1} 3"#, r#"a="1} 3"#] {
            assert_eq!(labels(broken), None, "{broken}");
        }
    }

    #[test]
    fn labels_with_braces_and_spaces_and_a_timestamp_do_not_confuse_the_reading() {
        let body = "vllm:num_requests_running{model_name=\"a } b\\\" c\"} 3 1700000000000\nvllm:num_requests_waiting{model_name=\"a } b\"}\t1e0\n";
        assert_eq!(parse_gauges(body).map(|r| r.queue), Some(queue(3, 1)));
    }

    #[test]
    fn bodies_without_both_gauges_say_nothing() {
        for body in [
            "",
            "404 page not found",
            r#"{"error":"not found"}"#,
            "<html>This server does not support metrics endpoint.</html>",
            "vllm:num_requests_running 3\n",
            "vllm:num_requests_waiting 3\n",
            "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n",
            "vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n",
            "vllm:num_requests_running_total 3\nvllm:num_requests_waiting_total 0\n",
            "# vllm:num_requests_running 3\n# vllm:num_requests_waiting 0\n",
        ] {
            assert_eq!(parse_gauges(body), None, "{body}");
        }
    }
}
