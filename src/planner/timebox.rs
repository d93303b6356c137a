//! Time-boxed recordings (`spec.duration`): the clock starts when the clone first gets traffic
//! (`status.recordingStartTime`); the end is that plus the duration (`recordingEndTime`, which a
//! patch of the duration moves); when it comes, production is put back as on deletion, the clone
//! is scaled to zero and the canary stays as a record, `Completed` (see `rollback`). The times
//! live in the status, so a restarted or replacement controller keeps the same clock.

use std::time::Duration;

use super::{Observed, Plan, after, fmt_time, parse_time, remaining};
use crate::api::status::Phase;

/// The spec's duration, when it is set and valid.
fn duration(o: &Observed) -> Option<Duration> {
    o.canary.spec.validate().ok().and_then(|s| s.duration)
}

/// Whether the recording is over: completed before, or its duration ran out since it started.
pub(super) fn is_over(o: &Observed) -> bool {
    let prev = o.canary.status.as_ref();
    if prev.and_then(|s| s.phase) == Some(Phase::Completed) {
        return true;
    }
    let start = parse_time(prev.and_then(|s| s.recording_start_time.as_deref()));
    match (duration(o), start) {
        (Some(d), Some(start)) => o.now >= after(start, d),
        _ => false,
    }
}

/// The time left as `kubectl get` shows it, and how long until that text changes: whole minutes
/// (hours and minutes past an hour) while a minute or more is left, then tens of seconds.
pub(super) fn time_left(left: Duration) -> (String, Duration) {
    let secs = left.as_secs();
    let (text, step): (String, u64) = if secs >= 3600 {
        (format!("{}h{}m", secs / 3600, secs % 3600 / 60), 60)
    } else if secs >= 60 {
        (format!("{}m", secs / 60), 60)
    } else {
        (format!("{}s", secs / 10 * 10), 10)
    };
    // Until the next boundary of `step` below `left` (at least 100 ms).
    let into_step = left.as_millis() % (u128::from(step) * 1000);
    let wait = Duration::from_millis(u64::try_from(into_step).unwrap_or(0) + 1);
    (text, wait.max(Duration::from_millis(100)))
}

/// The recording's clock in `plan`'s status: its start (the first plan that gives the clone
/// weight), the share it records, its end and the time left, with a requeue when the time left
/// changes its text (and so when it runs out).
pub(super) fn clock(o: &Observed, mut plan: Plan) -> Plan {
    let st = &mut plan.status;
    if st.current_percent > 0 {
        st.recorded_percent = Some(st.current_percent);
        if st.recording_start_time.is_none() {
            st.recording_start_time = Some(fmt_time(o.now));
        }
    }
    let start = parse_time(st.recording_start_time.as_deref());
    match (duration(o), start) {
        (Some(d), Some(start)) => {
            let end = after(start, d);
            st.recording_end_time = Some(fmt_time(end));
            let left = remaining(o.now, end).unwrap_or(Duration::ZERO);
            let (text, wait) = time_left(left);
            st.time_left = Some(text);
            let wait = wait.min(left.max(Duration::from_millis(100)));
            plan.requeue_after = Some(plan.requeue_after.map_or(wait, |r| r.min(wait)));
        }
        (Some(d), None) => {
            // Not started: the whole duration is left.
            st.recording_end_time = None;
            st.time_left = Some(time_left(d).0);
        }
        (None, _) => {
            st.recording_end_time = None;
            st.time_left = None;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_is_shown_in_minutes_then_tens_of_seconds_and_changes_on_its_boundaries() {
        let s = Duration::from_secs;
        assert_eq!(time_left(s(5400)).0, "1h30m");
        assert_eq!(time_left(s(1799)).0, "29m");
        assert_eq!(time_left(s(60)).0, "1m");
        assert_eq!(time_left(s(59)).0, "50s");
        assert_eq!(time_left(s(9)).0, "0s");
        // 29 min 30 s left: the text changes in 30 s; 45 s left: in 5 s.
        assert_eq!(time_left(s(1770)).1, Duration::from_millis(30_001));
        assert_eq!(time_left(s(45)).1, Duration::from_millis(5_001));
        assert_eq!(time_left(s(60)).1, Duration::from_millis(100));
    }
}
