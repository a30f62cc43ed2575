//! Rate-limited requests waiting to go out again unchanged, pure: each with the time (on the
//! dispatcher's clock) after which it may.

use std::collections::VecDeque;
use std::time::Duration;

use super::call::Request;

#[derive(Debug, Default)]
pub struct Resends {
    waiting: VecDeque<(Duration, Request)>,
}

impl Resends {
    pub fn push(&mut self, at: Duration, request: Request) {
        self.waiting.push_back((at, request));
    }

    /// The first request whose wait is over at `now`, with its time.
    pub fn take_due(&mut self, now: Duration) -> Option<(Duration, Request)> {
        let index = self.waiting.iter().position(|(at, _)| *at <= now)?;
        self.waiting.remove(index)
    }

    /// Items of requests whose wait is over at `now`.
    pub fn items_due(&self, now: Duration) -> usize {
        self.waiting.iter().filter(|(at, _)| *at <= now).map(|(_, r)| r.claimed.len()).sum()
    }

    /// When the next request may go out again.
    pub fn next_at(&self) -> Option<Duration> {
        self.waiting.iter().map(|(at, _)| *at).min()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Every waiting request, emptying the queue (the run is stopping).
    pub fn drain(&mut self) -> impl Iterator<Item = Request> + '_ {
        self.waiting.drain(..).map(|(_, request)| request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Tier;
    use crate::store::{Claimed, Lease};

    fn request(items: usize) -> Request {
        let claimed = (0..items)
            .map(|i| Claimed {
                lease: Lease { item_id: i.to_string(), token: 0 },
                attempts: 0,
                tier: 0,
                item: crate::store::Item { id: i.to_string(), fields: Vec::new() },
            })
            .collect();
        Request::from_ledger(claimed, "m".into(), "h".into(), Tier::Sync)
    }

    #[test]
    fn requests_go_out_again_only_once_their_wait_is_over() {
        let mut resends = Resends::default();
        let s = Duration::from_secs;
        resends.push(s(5), request(3));
        resends.push(s(2), request(2));
        assert_eq!(resends.next_at(), Some(s(2)));
        assert_eq!(resends.items_due(s(1)), 0);
        assert!(resends.take_due(s(1)).is_none());
        assert_eq!(resends.items_due(s(5)), 5);
        let (at, due) = resends.take_due(s(3)).expect("one is due");
        assert_eq!((at, due.claimed.len()), (s(2), 2));
        assert_eq!(resends.next_at(), Some(s(5)));
        assert_eq!(resends.drain().map(|r| r.claimed.len()).sum::<usize>(), 3);
        assert!(resends.is_empty());
    }
}
