//! What a self-hosted server shows of its load while the run goes on: at `GET /metrics`, in
//! Prometheus's text format, vLLM counts the requests it runs and those waiting for a slot
//! (`vllm:num_requests_running`, `vllm:num_requests_waiting`), llama.cpp's `llama-server` does
//! when started with `--metrics` (`llamacpp:requests_processing`, `llamacpp:requests_deferred`)
//! and Hugging Face's text-generation-inference does too (`tgi_batch_current_size`,
//! `tgi_queue_size`). Every client's requests are counted, not only ours. Servers without such
//! gauges (Ollama, hosted APIs, most proxies) answer 404 or something else, and the run goes on
//! without them.

use std::time::Duration;

use backfill_controller::ServerQueue;

use super::ChatClient;

/// How long one reading may take: the server answers its gauges at once or is not read.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of the answer read (vLLM's histograms make it tens of kilobytes).
const GAUGES_MAX_BYTES: u64 = 4 << 20;

/// The gauges each server names: `(server, running, waiting)`.
const KNOWN_GAUGES: [(&str, &str, &str); 3] = [
    ("vLLM", "vllm:num_requests_running", "vllm:num_requests_waiting"),
    ("llama.cpp", "llamacpp:requests_processing", "llamacpp:requests_deferred"),
    ("text-generation-inference", "tgi_batch_current_size", "tgi_queue_size"),
];

/// One reading of the server's gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaugeReading {
    pub queue: ServerQueue,
    /// The server whose gauges they are, and the name of its waiting gauge.
    pub server: &'static str,
    pub waiting_gauge: &'static str,
}

/// The value of one sample line (`name{labels} value [timestamp]`) when its metric is `name`.
fn sample_value(line: &str, name: &str) -> Option<f64> {
    let rest = line.strip_prefix(name)?;
    let rest = if let Some(labels) = rest.strip_prefix('{') {
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
        &labels[end? + 1..]
    } else if rest.starts_with([' ', '\t']) {
        rest
    } else {
        // Another metric whose name starts with this one's.
        return None;
    };
    rest.split_whitespace().next()?.parse::<f64>().ok()
}

/// The sum of a gauge's samples over all its label sets (vLLM labels them by model and
/// engine); `None` when the body holds no sample of it.
fn gauge_sum(body: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in body.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        if let Some(value) = sample_value(line, name) {
            if !value.is_finite() || value < 0.0 {
                return None;
            }
            sum = Some(sum.unwrap_or(0.0) + value);
        }
    }
    sum
}

/// Reads a `GET /metrics` body: the first known server whose running and waiting gauges are
/// both there.
pub fn parse_gauges(body: &str) -> Option<GaugeReading> {
    KNOWN_GAUGES.iter().find_map(|(server, running, waiting)| {
        let running_now = gauge_sum(body, running)?;
        let waiting_now = gauge_sum(body, waiting)?;
        let count = |value: f64| value.round().min(f64::from(u32::MAX)) as u32;
        Some(GaugeReading {
            queue: ServerQueue { running: count(running_now), waiting: count(waiting_now) },
            server,
            waiting_gauge: waiting,
        })
    })
}

impl ChatClient {
    /// Reads the server's gauges once (`GET /metrics` beside the API root, with the job's key),
    /// within two seconds; any failure is `None`.
    pub async fn server_gauges(&self) -> Option<GaugeReading> {
        let body = self.get_beside_the_root("metrics", GAUGES_MAX_BYTES, GAUGES_TIMEOUT).await?;
        parse_gauges(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(running: u32, waiting: u32) -> ServerQueue {
        ServerQueue { running, waiting }
    }

    #[test]
    fn vllms_gauges_are_summed_over_models_and_engines() {
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
