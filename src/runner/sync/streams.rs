//! Whether the run asks for streamed answers (`model.stream`), and the first chunks they bring.
//!
//! A streamed answer's first chunk comes when the server's slot has taken the request up and
//! read its prompt; a request waiting in a self-hosted server's queue brings none until a slot
//! frees. The controller reads its requests in flight from these as a server's gauges would
//! show them (running, waiting), on servers that show no gauges of their own. With
//! `model.stream = "auto"` the run stops asking for streams when the provider announces rate
//! limits (it is paced by them), refuses a streamed request, or streams answers without their
//! token counts.

use std::time::Instant;

use backfill_controller::{RateLimitInfo, Ticket};
use tokio::sync::mpsc;

use super::call::{FirstChunks, StreamNote};
use crate::job::Streaming;

pub struct Streams {
    mode: Streaming,
    on: bool,
    sender: FirstChunks,
    arrived: mpsc::UnboundedReceiver<(Ticket, Instant)>,
}

impl Streams {
    /// `gauges`: the server shows its own gauges of requests running and waiting, which say
    /// more (other clients' requests too): "auto" does not stream there.
    pub fn new(mode: Streaming, gauges: bool) -> Streams {
        let (sender, arrived) = mpsc::unbounded_channel();
        let on = match mode {
            Streaming::Always => true,
            Streaming::Auto => !gauges,
            Streaming::Never => false,
        };
        if on {
            tracing::info!(
                "answers are asked for as streams (model.stream = \"{}\"): the first chunk of each shows when the \
                 server took the request up",
                if mode == Streaming::Always { "always" } else { "auto" }
            );
        }
        Streams { mode, on, sender, arrived }
    }

    /// Where a call about to be sent says when its first chunk came; `None`: send it whole.
    pub fn for_call(&self) -> Option<FirstChunks> {
        self.on.then(|| self.sender.clone())
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

    /// What a finished call showed: with "auto", the run streams no more after a refusal, an
    /// answer streamed without its token counts, or an answer announcing rate limits.
    pub fn observe(&mut self, note: Option<&StreamNote>, rate_limits: &RateLimitInfo) {
        if !self.on || self.mode != Streaming::Auto {
            return;
        }
        let why = match note {
            Some(StreamNote::Refused(refusal)) => format!(
                "the provider refused a streamed request ({refusal}): it goes out again unstreamed, and so do the \
                 run's other requests (set model.stream = \"never\" not to ask)"
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
                return;
            }
            _ => return,
        };
        tracing::warn!("{why}");
        self.on = false;
    }
}

fn announces(info: &RateLimitInfo) -> bool {
    [info.requests, info.tokens, info.input_tokens, info.output_tokens].iter().any(|window| window.limit.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backfill_controller::LimitWindow;

    #[test]
    fn auto_streams_until_the_provider_announces_limits_refuses_or_leaves_out_the_counts() {
        let quiet = RateLimitInfo::default();
        let announced = RateLimitInfo { requests: LimitWindow { limit: Some(500), ..LimitWindow::default() }, ..RateLimitInfo::default() };
        for (note, headers, streams_on) in [
            (Some(StreamNote::Counted), &quiet, true),
            (None, &quiet, true),
            (Some(StreamNote::Counted), &announced, false),
            (None, &announced, false),
            (Some(StreamNote::Uncounted), &quiet, false),
            (Some(StreamNote::Refused("HTTP 422: stream_options".into())), &quiet, false),
        ] {
            let mut streams = Streams::new(Streaming::Auto, false);
            assert!(streams.for_call().is_some());
            streams.observe(note.as_ref(), headers);
            assert_eq!(streams.for_call().is_some(), streams_on, "{note:?}, {headers:?}");
        }
    }

    #[test]
    fn always_streams_whatever_comes_and_never_does_not() {
        let announced = RateLimitInfo { tokens: LimitWindow { limit: Some(9), ..LimitWindow::default() }, ..RateLimitInfo::default() };
        let mut always = Streams::new(Streaming::Always, true);
        always.observe(Some(&StreamNote::Uncounted), &announced);
        always.observe(Some(&StreamNote::Refused("HTTP 400".into())), &announced);
        assert!(always.for_call().is_some());
        assert!(Streams::new(Streaming::Never, false).for_call().is_none());
        assert!(Streams::new(Streaming::Auto, true).for_call().is_none(), "a server showing its gauges");
    }
}
