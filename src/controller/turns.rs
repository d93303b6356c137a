//! Turns to reconcile: at most `n` canaries at work at once, their traffic before their reports.
//!
//! A reconcile takes a [`Lane::Traffic`] turn to observe, plan and write what routes the requests
//! (routes, Services, the clone, labels). If it wrote, it gives that turn back and takes a
//! [`Lane::Report`] turn for its Events and status. A freed turn goes to a reconcile waiting in
//! the traffic lane first: under a burst (a GitOps sync that ramps 1,000 canaries at once) each
//! canary's routes are written before the reports of the canaries ahead of it, so the weights
//! follow the patches at the pace of one write per canary, not three. While both lanes wait,
//! every [`REPORT_EVERY`]-th freed turn goes to a report, so reports are late under a burst but
//! never starve.
//!
//! Pure bookkeeping and a channel per waiter; no I/O. Waiters of a lane are served first come,
//! first served; a waiter that gives up (its reconcile dropped at shutdown) is skipped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// While both lanes wait, one freed turn in this many goes to a report.
pub const REPORT_EVERY: usize = 8;

/// What a reconcile does with its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Observe, plan and write the canary's objects.
    Traffic,
    /// Publish the Events and write the status of writes already made.
    Report,
}

#[derive(Debug)]
struct State {
    free: usize,
    traffic: VecDeque<oneshot::Sender<Turn>>,
    report: VecDeque<oneshot::Sender<Turn>>,
    /// Turns handed to the traffic lane in a row while a report waited.
    traffic_in_row: usize,
}

impl State {
    /// The next waiter to hand a freed turn to, if any.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Turn>> {
        let report_due = self.traffic.is_empty() || self.traffic_in_row + 1 >= REPORT_EVERY;
        if !self.report.is_empty() && report_due {
            self.traffic_in_row = 0;
            return self.report.pop_front();
        }
        let w = self.traffic.pop_front()?;
        if self.report.is_empty() {
            self.traffic_in_row = 0;
        } else {
            self.traffic_in_row += 1;
        }
        Some(w)
    }
}

/// The turns of every scope's reconciles together.
#[derive(Debug, Clone)]
pub struct Turns {
    state: Arc<Mutex<State>>,
}

/// A turn, given back when dropped.
#[derive(Debug)]
pub struct Turn {
    /// `None` once disarmed (a turn that never counted, or one being handed over).
    state: Option<Arc<Mutex<State>>>,
}

impl Turns {
    /// `n` turns (at least 1).
    pub fn new(n: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                free: n.max(1),
                traffic: VecDeque::new(),
                report: VecDeque::new(),
                traffic_in_row: 0,
            })),
        }
    }

    /// Waits for a turn in `lane`.
    pub async fn take(&self, lane: Lane) -> Turn {
        let rx = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if s.free > 0 && s.traffic.is_empty() && s.report.is_empty() {
                s.free -= 1;
                return Turn {
                    state: Some(self.state.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            match lane {
                Lane::Traffic => s.traffic.push_back(tx),
                Lane::Report => s.report.push_back(tx),
            }
            rx
        };
        // The sender is dropped unsent only with the whole `Turns`: then there is no limit left.
        rx.await.unwrap_or(Turn { state: None })
    }

    /// Turns not taken.
    #[cfg(test)]
    pub fn free(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .free
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(w) = s.next_waiter() {
            match w.send(Turn {
                state: Some(state.clone()),
            }) {
                Ok(()) => return,
                // That waiter gave up: disarm the turn it did not take and try the next one.
                Err(mut unsent) => unsent.state = None,
            }
        }
        s.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Starts a task that takes a turn in `lane` and records its `label` in `order` once it has it;
    /// the turn is kept until `release` fires.
    fn waiter(
        turns: &Turns,
        lane: Lane,
        label: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
        release: &Arc<tokio::sync::Notify>,
    ) -> tokio::task::JoinHandle<()> {
        let (turns, order, release) = (turns.clone(), order.clone(), release.clone());
        tokio::spawn(async move {
            let _t = turns.take(lane).await;
            order.lock().unwrap().push(label);
            release.notified().await;
        })
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn no_more_than_n_turns_are_out_at_once() {
        let turns = Turns::new(3);
        let (out, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (turns, out, most) = (turns.clone(), out.clone(), most.clone());
                tokio::spawn(async move {
                    let lane = if i % 2 == 0 {
                        Lane::Traffic
                    } else {
                        Lane::Report
                    };
                    let _t = turns.take(lane).await;
                    let now = out.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    out.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert_eq!(turns.free(), 3, "every turn came back");
    }

    #[tokio::test]
    async fn a_freed_turn_goes_to_waiting_traffic_before_an_earlier_report() {
        let turns = Turns::new(1);
        let held = turns.take(Lane::Traffic).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Notify::new());
        let r = waiter(&turns, Lane::Report, "report", &order, &release);
        settle().await;
        let t = waiter(&turns, Lane::Traffic, "traffic", &order, &release);
        settle().await;
        drop(held);
        settle().await;
        assert_eq!(*order.lock().unwrap(), vec!["traffic"]);
        release.notify_one();
        settle().await;
        assert_eq!(*order.lock().unwrap(), vec!["traffic", "report"]);
        release.notify_one();
        t.await.unwrap();
        r.await.unwrap();
        assert_eq!(turns.free(), 1);
    }

    #[tokio::test]
    async fn reports_get_one_turn_in_report_every_while_traffic_keeps_waiting() {
        let turns = Turns::new(1);
        let held = turns.take(Lane::Traffic).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Notify::new());
        let mut tasks = vec![waiter(&turns, Lane::Report, "report", &order, &release)];
        settle().await;
        for _ in 0..2 * REPORT_EVERY {
            tasks.push(waiter(&turns, Lane::Traffic, "traffic", &order, &release));
            settle().await;
        }
        drop(held);
        for _ in 0..=2 * REPORT_EVERY {
            settle().await;
            release.notify_one();
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let at = order.iter().position(|l| *l == "report").unwrap();
        assert_eq!(
            at,
            REPORT_EVERY - 1,
            "the report comes after {} traffic turns: {order:?}",
            REPORT_EVERY - 1
        );
        assert_eq!(turns.free(), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_gave_up_is_skipped_and_its_turn_not_lost() {
        let turns = Turns::new(1);
        let held = turns.take(Lane::Traffic).await;
        let gave_up = {
            let turns = turns.clone();
            tokio::spawn(async move {
                let _t = turns.take(Lane::Traffic).await;
            })
        };
        settle().await;
        gave_up.abort();
        let _ = gave_up.await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Notify::new());
        let next = waiter(&turns, Lane::Report, "report", &order, &release);
        settle().await;
        drop(held);
        settle().await;
        assert_eq!(*order.lock().unwrap(), vec!["report"]);
        release.notify_one();
        next.await.unwrap();
        assert_eq!(turns.free(), 1, "no turn leaked");
    }

    #[tokio::test]
    async fn a_turn_handed_to_a_waiter_that_then_gives_up_comes_back() {
        let turns = Turns::new(1);
        let held = turns.take(Lane::Traffic).await;
        let waiting = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(Lane::Report).await })
        };
        settle().await;
        // Handed over (sent), then the waiter's task ends before it reads it.
        drop(held);
        waiting.abort();
        let _ = waiting.await;
        settle().await;
        assert_eq!(turns.free(), 1, "no turn leaked");
    }
}
