//! Whether the run asks for streamed answers (`model.stream`), and the first chunks they bring.
//!
//! A streamed answer's first chunk comes when the server's slot has taken the request up and
//! read its prompt; a request waiting in a self-hosted server's queue brings none until a slot
//! frees. The controller reads its requests in flight from these as a server's gauges would
//! show them (running, waiting), on servers that show nothing of their load.
//!
//! With `model.stream = "auto"` the run streams only against a server at a local or private
//! address (`localhost`, a private or link-local IP, a name without a dot or under `.local`,
//! `.internal`, `.lan`, `.home.arpa`) that said neither its slots (`GET /props`) nor its gauges
//! (`GET /metrics`): there the first chunks are the only sign of its queue, and a hosted API's
//! times to a first chunk (its routing, its thinking) say nothing of one. It stops when the
//! provider announces rate limits, streams answers without their token counts, or cannot
//! stream: a streamed request that fails before any streamed answer came whole and before its
//! own first chunk, as a server fails what it cannot take (`call::refuses_streams`), goes out
//! again at once unstreamed, counted against none of its items' attempts, and when that
//! answer comes the run streams no more (when it fails too, the failure was the request's).

use std::net::IpAddr;
use std::time::Instant;

use backfill_controller::{RateLimitInfo, Ticket};
use tokio::sync::mpsc;

use super::call::{FirstChunks, StreamNote};
use crate::job::Streaming;

pub struct Streams {
    mode: Streaming,
    on: bool,
    /// A streamed answer came whole with its token counts: the server can stream.
    confirmed: bool,
    /// Why the last streamed request that failed before any text came failed.
    failure: Option<String>,
    sender: FirstChunks,
    arrived: mpsc::UnboundedReceiver<(Ticket, Instant)>,
}

/// How a call about to be sent asks for its answer.
#[derive(Debug)]
pub struct StreamCall {
    /// Where the moment of its first chunk goes.
    pub first_chunks: FirstChunks,
    /// A failure of this streamed request sends it again unstreamed and ends the streaming
    /// ("auto", before the server has shown that it streams).
    pub fall_back: bool,
}

impl Streams {
    /// `base_url`: the job's API root; `shows_load`: the server said its slots before the run
    /// or shows its gauges of requests running and waiting, which say more than first chunks.
    pub fn new(mode: Streaming, base_url: &str, shows_load: bool) -> Streams {
        let (sender, arrived) = mpsc::unbounded_channel();
        let on = match mode {
            Streaming::Always => true,
            Streaming::Auto => !shows_load && looks_self_hosted(base_url),
            Streaming::Never => false,
        };
        if on {
            tracing::info!(
                "answers are asked for as streams (model.stream = \"{}\"): the first chunk of each shows when the \
                 server took the request up, and so the requests waiting in its queue",
                if mode == Streaming::Always { "always" } else { "auto" }
            );
        }
        Streams { mode, on, confirmed: false, failure: None, sender, arrived }
    }

    /// How a call about to be sent asks for its answer; `None`: whole.
    pub fn for_call(&self) -> Option<StreamCall> {
        self.on.then(|| StreamCall {
            first_chunks: self.sender.clone(),
            fall_back: self.mode == Streaming::Auto && !self.confirmed,
        })
    }

    /// How a rate-limited request that first went out streamed goes out again: streamed, as
    /// it went (its body unchanged), whether or not the run streams now.
    pub fn for_resend(&self) -> StreamCall {
        StreamCall { first_chunks: self.sender.clone(), fall_back: false }
    }

    /// The first chunks that arrived since the last call, with when.
    pub fn arrived(&mut self) -> Vec<(Ticket, Instant)> {
        let mut arrived = Vec::new();
        while let Ok(chunk) = self.arrived.try_recv() {
            arrived.push(chunk);
        }
        arrived
    }

    /// Waits for the next first chunk (never, while not streaming).
    pub async fn next(&mut self) -> Option<(Ticket, Instant)> {
        if !self.on {
            return std::future::pending().await;
        }
        self.arrived.recv().await
    }

    /// What a finished call showed. With "auto", the run streams no more after a request that
    /// had failed streamed before the server had shown that it streams was answered unstreamed,
    /// an answer streamed without its token counts, or an answer announcing rate limits. True
    /// when streaming stops now.
    pub fn observe(&mut self, note: Option<&StreamNote>, rate_limits: &RateLimitInfo) -> bool {
        if !self.on || self.mode != Streaming::Auto {
            return false;
        }
        let why = match note {
            Some(StreamNote::Counted) if !announces(rate_limits) => {
                self.confirmed = true;
                return false;
            }
            // Whose failure it was, the request's or the stream's, its unstreamed answer tells.
            Some(StreamNote::Failed(failure)) => {
                if !self.confirmed {
                    tracing::info!("a streamed request failed ({failure}): it goes out again unstreamed");
                    self.failure = Some(failure.clone());
                }
                return false;
            }
            // Once a streamed answer came whole, a failed one was the request's own affair.
            Some(StreamNote::AnsweredUnstreamed) if self.confirmed => return false,
            Some(StreamNote::AnsweredUnstreamed) => format!(
                "a request that failed streamed ({}) was answered unstreamed: the run's other requests go unstreamed \
                 too (set model.stream = \"never\" not to ask for streams, or \"always\" to insist)",
                self.failure.as_deref().unwrap_or("no reason given")
            ),
            Some(StreamNote::Uncounted) => "the provider streams answers without their token counts (`usage`), \
                 which cost them exactly: the run's other requests go unstreamed (set model.stream = \"never\" not to \
                 ask; the answer is costed at its reservation)"
                .to_owned(),
            _ if announces(rate_limits) => {
                tracing::info!(
                    "the provider announces its rate limits: the run is paced by them, and its requests go unstreamed"
                );
                self.on = false;
                return true;
            }
            _ => return false,
        };
        tracing::warn!("{why}");
        self.on = false;
        true
    }
}

fn announces(info: &RateLimitInfo) -> bool {
    [info.requests, info.tokens, info.input_tokens, info.output_tokens].iter().any(|window| window.limit.is_some())
}

/// A server at a local or private address: loopback, private, link-local, shared (CGNAT,
/// as VPNs hand out) or unique-local IPs, `localhost`, a name without a dot (a container's or
/// a LAN host's) or under a suffix kept for local names.
pub fn looks_self_hosted(base_url: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(base_url) else { return false };
    match url.host() {
        Some(url::Host::Ipv4(ip)) => local_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => local_ip(IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            !name.contains('.')
                || [".localhost", ".local", ".internal", ".lan", ".home.arpa"].iter().any(|suffix| name.ends_with(suffix))
        }
        None => false,
    }
}

fn local_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            // 0.0.0.0, which servers print as the address they listen on, reaches this host.
            ip.is_loopback() || ip.is_unspecified() || ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => local_ip(IpAddr::V4(v4)),
            None => {
                let first = ip.segments()[0];
                ip.is_loopback() || ip.is_unspecified() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backfill_controller::LimitWindow;

    const LOCAL: &str = "http://127.0.0.1:8080/v1";

    #[test]
    fn auto_streams_until_the_provider_announces_limits_fails_a_first_stream_or_leaves_out_the_counts() {
        let quiet = RateLimitInfo::default();
        let announced = RateLimitInfo { requests: LimitWindow { limit: Some(500), ..LimitWindow::default() }, ..RateLimitInfo::default() };
        for (note, headers, streams_on) in [
            (Some(StreamNote::Counted), &quiet, true),
            (None, &quiet, true),
            (Some(StreamNote::Counted), &announced, false),
            (None, &announced, false),
            (Some(StreamNote::Uncounted), &quiet, false),
            (Some(StreamNote::Failed("HTTP 422: stream_options".into())), &quiet, true),
            (Some(StreamNote::AnsweredUnstreamed), &quiet, false),
        ] {
            let mut streams = Streams::new(Streaming::Auto, LOCAL, false);
            assert!(streams.for_call().is_some_and(|call| call.fall_back));
            assert_eq!(streams.observe(note.as_ref(), headers), !streams_on);
            assert_eq!(streams.for_call().is_some(), streams_on, "{note:?}, {headers:?}");
        }
        // Once a streamed answer came whole, a failed one is the request's own affair.
        let mut streams = Streams::new(Streaming::Auto, LOCAL, false);
        streams.observe(Some(&StreamNote::Counted), &quiet);
        assert!(streams.for_call().is_some_and(|call| !call.fall_back));
        // A request sent before then may still fail so, and be answered unstreamed: the
        // streaming goes on.
        assert!(!streams.observe(Some(&StreamNote::Failed("HTTP 400".into())), &quiet));
        assert!(!streams.observe(Some(&StreamNote::AnsweredUnstreamed), &quiet));
        assert!(streams.for_call().is_some());
    }

    #[test]
    fn always_streams_whatever_comes_and_never_does_not() {
        let announced = RateLimitInfo { tokens: LimitWindow { limit: Some(9), ..LimitWindow::default() }, ..RateLimitInfo::default() };
        let mut always = Streams::new(Streaming::Always, "https://api.openai.com/v1", true);
        always.observe(Some(&StreamNote::Uncounted), &announced);
        assert!(always.for_call().is_some_and(|call| !call.fall_back));
        assert!(Streams::new(Streaming::Never, LOCAL, false).for_call().is_none());
        assert!(Streams::new(Streaming::Auto, LOCAL, true).for_call().is_none(), "a server showing its slots or gauges");
        assert!(Streams::new(Streaming::Auto, "https://openrouter.ai/api/v1", false).for_call().is_none(), "a hosted API");
    }

    #[test]
    fn local_and_private_addresses_look_self_hosted_and_public_ones_do_not() {
        for url in [
            "http://localhost:11434/v1",
            "http://127.0.0.1:8080/v1",
            "http://[::1]:8000/v1",
            "http://10.0.3.7/v1",
            "http://192.168.1.20:8000/v1",
            "http://172.20.0.5/v1",
            "http://100.101.102.103:8000/v1",
            "http://169.254.1.1/v1",
            "http://[fd12:3456::1]/v1",
            "http://ollama:11434/v1",
            "http://vllm.internal/v1",
            "http://gpu-box.local:8000/v1",
            "http://llm.lan/v1",
            "http://0.0.0.0:8080/v1",
            "http://[::]:8000/v1",
            "http://[::ffff:192.168.1.20]:8000/v1",
        ] {
            assert!(looks_self_hosted(url), "{url}");
        }
        for url in ["https://api.openai.com/v1", "https://openrouter.ai/api/v1", "http://8.8.8.8/v1", "http://[2001:db8::1]/v1", "http://[::ffff:8.8.8.8]/v1", "not a url"] {
            assert!(!looks_self_hosted(url), "{url}");
        }
    }
}
