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
    /// The label that tells the server's independent parts apart (vLLM's engines, SGLang's
    /// data-parallel ranks): their counts add up. Samples that share its value are one part
    /// seen several times (SGLang's tensor- and pipeline-parallel ranks repeat their group's
    /// figures), of which the largest is taken. Without it, every sample adds up.
    part: Option<&'static str>,
}

const KNOWN_GAUGES: [KnownGauges; 4] = [
    KnownGauges {
        server: "vLLM",
        running: "vllm:num_requests_running",
        waiting: "vllm:num_requests_waiting",
        part: Some("engine"),
    },
    KnownGauges {
        server: "llama.cpp",
        running: "llamacpp:requests_processing",
        waiting: "llamacpp:requests_deferred",
        part: None,
    },
    KnownGauges {
        server: "SGLang",
        running: "sglang:num_running_reqs",
        waiting: "sglang:num_queue_reqs",
        part: Some("dp_rank"),
    },
    KnownGauges {
        server: "text-generation-inference",
        running: "tgi_batch_current_size",
        waiting: "tgi_queue_size",
        part: None,
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

/// One sample line (`name{labels} value [timestamp]`) of the metric `name`: its labels (the
/// text between the braces, empty without) and its value.
fn sample<'a>(line: &'a str, name: &str) -> Option<(&'a str, f64)> {
    let rest = line.strip_prefix(name)?;
    let (labels, rest) = if let Some(labels) = rest.strip_prefix('{') {
        // Label values are quoted and may hold braces and spaces: the labels end at the first
        // `}` outside quotes.
        let mut quoted = false;
        let mut escaped = false;
        let mut end = None;
        for (at, c) in labels.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    end = Some(at);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        (&labels[..end], &labels[end + 1..])
    } else if rest.starts_with([' ', '\t']) {
        ("", rest)
    } else {
        // Another metric whose name starts with this one's.
        return None;
    };
    Some((labels, rest.split_whitespace().next()?.parse::<f64>().ok()?))
}

/// The value of the label `key` among `labels` (`a="1",b="x"`), escapes kept as they are
/// (only compared, never shown).
fn label_value<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut escaped = false;
        let end = after.char_indices().find_map(|(at, c)| match c {
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
        })?;
        if name.trim() == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
}

/// A gauge's value over the server's parts (see `KnownGauges::part`): `None` when the body
/// holds no sample of it, or one that is not a count.
fn gauge_total(body: &str, name: &str, part: Option<&str>) -> Option<f64> {
    let mut parts: HashMap<&str, f64> = HashMap::new();
    let mut unlabelled = 0.0;
    let mut seen = false;
    for line in body.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let Some((labels, value)) = sample(line, name) else { continue };
        if !value.is_finite() || value < 0.0 {
            return None;
        }
        seen = true;
        match part.map(|key| label_value(labels, key).unwrap_or("")) {
            Some(key) => {
                let most = parts.entry(key).or_insert(0.0);
                *most = most.max(value);
            }
            None => unlabelled += value,
        }
    }
    seen.then(|| unlabelled + parts.values().sum::<f64>())
}

fn count(value: f64) -> u32 {
    value.round().min(f64::from(u32::MAX)) as u32
}

/// Reads a `GET /metrics` body: the first known server whose running and waiting gauges are
/// both there.
pub fn parse_gauges(body: &str) -> Option<GaugeReading> {
    KNOWN_GAUGES.iter().find_map(|known| {
        let running = gauge_total(body, known.running, known.part)?;
        let waiting = gauge_total(body, known.waiting, known.part)?;
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

#[derive(Deserialize)]
struct RankLoad {
    num_running_reqs: u64,
    num_waiting_reqs: u64,
}

/// Reads SGLang's `GET /v1/loads` body: the requests running and waiting, summed over its
/// data-parallel ranks; `None` unless at least one rank counts both.
pub fn parse_loads(body: &str) -> Option<GaugeReading> {
    let body: LoadsBody = serde_json::from_str(body).ok()?;
    if body.loads.is_empty() {
        return None;
    }
    let sum = |of: fn(&RankLoad) -> u64| count(body.loads.iter().map(of).sum::<u64>() as f64);
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
        for body in [
            "",
            "404 page not found",
            r#"{"detail":"Not Found"}"#,
            r#"{"loads":[]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":3}]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":-1,"num_waiting_reqs":0}]}"#,
            r#"{"loads":[{"dp_rank":0,"num_running_reqs":1.5,"num_waiting_reqs":0}]}"#,
        ] {
            assert_eq!(parse_loads(body), None, "{body}");
        }
    }

    #[test]
    fn label_values_are_found_by_their_key_alone() {
        let labels = r#"model_name="a,b=\"c\"",engine="1", dp_rank="2""#;
        assert_eq!(label_value(labels, "engine"), Some("1"));
        assert_eq!(label_value(labels, "dp_rank"), Some("2"));
        assert_eq!(label_value(labels, "model_name"), Some(r#"a,b=\"c\""#));
        assert_eq!(label_value(labels, "rank"), None);
        assert_eq!(label_value("", "engine"), None);
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
