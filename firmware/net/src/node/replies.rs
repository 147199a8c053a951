//! Receptor requests a cell answers later ([`crate::cell::Cell::handle_request_later`]): the
//! waiting clients' reply channels, by ticket, bounded in number
//! ([`MAX_DEFERRED_REPLIES`]) and in time ([`REPLY_DEADLINE_MS`]).

use std::collections::HashMap;

use serde_json::Value;
use tokio::sync::oneshot;

use super::host::HostError;
use crate::cell::{MAX_DEFERRED_REPLIES, REPLY_DEADLINE_MS};

type Answer = Result<Value, HostError>;

/// Clients waiting for a cell's deferred answer.
#[derive(Default)]
pub(crate) struct Replies {
    next: u64,
    waiting: HashMap<u64, (u64, oneshot::Sender<Answer>)>,
}

impl Replies {
    /// The ticket for the next request, or `None` when too many wait already.
    pub(crate) fn ticket(&mut self) -> Option<u64> {
        if self.waiting.len() >= MAX_DEFERRED_REPLIES {
            return None;
        }
        self.next += 1;
        Some(self.next)
    }

    /// The cell deferred the request with `ticket` at `now_ms`.
    pub(crate) fn wait(&mut self, ticket: u64, now_ms: u64, reply: oneshot::Sender<Answer>) {
        self.waiting
            .insert(ticket, (now_ms + REPLY_DEADLINE_MS, reply));
    }

    /// The cell answered `ticket` (ignored if nobody waits for it any more).
    pub(crate) fn answer(&mut self, ticket: u64, answer: Answer) {
        if let Some((_, reply)) = self.waiting.remove(&ticket) {
            let _ = reply.send(answer);
        }
    }

    /// Answer `timeout` to every request past its deadline, and forget clients that left.
    pub(crate) fn expire(&mut self, now_ms: u64) {
        self.waiting.retain(|_, (_, reply)| !reply.is_closed());
        let late: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now_ms)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.answer(
                t,
                Err((504, "timeout", "the cell did not answer in time".into())),
            );
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_request_times_out_and_the_number_waiting_is_bounded() {
        let mut r = Replies::default();
        let t = r.ticket().unwrap();
        let (tx, mut rx) = oneshot::channel();
        r.wait(t, 0, tx);
        r.expire(REPLY_DEADLINE_MS - 1);
        assert!(rx.try_recv().is_err(), "not yet due");
        r.expire(REPLY_DEADLINE_MS);
        assert_eq!(rx.try_recv().unwrap().unwrap_err().1, "timeout");
        assert_eq!(r.len(), 0);
        let mut keep = Vec::new();
        for _ in 0..MAX_DEFERRED_REPLIES {
            let t = r.ticket().unwrap();
            let (tx, rx) = oneshot::channel();
            r.wait(t, 0, tx);
            keep.push(rx);
        }
        assert!(r.ticket().is_none(), "the bound holds");
        r.answer(1 + 1, Ok(Value::Null));
        assert!(r.ticket().is_some(), "an answer frees a place");
    }
}
