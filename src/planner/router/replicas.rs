//! The Replicas router, for clusters with no mesh: the clone's pods carry the Service's selector
//! labels, so the Service spreads its requests over the target's pods and the clone's, and the
//! clone's share is its share of the Service's Ready endpoints (Speedscale's guide records "by
//! hand, with a second Deployment behind the same labels"; this automates it). With Speedscale's
//! eBPF capture it records with no mesh at all.
//!
//! The clone is sized so that its share never exceeds `percent`: beside `n` target replicas,
//! `floor(n × p / (100 − p))` clone replicas (1 beside 9 is 10 %). The share moves in steps of
//! one pod, so a condition says how coarse it is at this size; below one pod's worth, no clone
//! runs. There is no route to write and no mesh to wait for; rollback removes the clone.
//! Whatever selects the target's labels (its HPA, a PodDisruptionBudget) counts the clone's pods
//! too (see docs/limits.md).

use crate::api::Mode;
use crate::api::status::Phase;
use crate::planner::block::{Block, Checked};
use crate::planner::safety::{self, CloneHealth};
use crate::planner::{Builder, Observed, Plan, pod_of_deployment};

/// The spec fields this router cannot honour: it has no routes, so no request-level choice.
pub(in crate::planner) fn check(o: &Observed) -> Result<(), Block> {
    let spec = &o.canary.spec;
    let unsupported = [
        (spec.mode == Mode::Mirror, "mode Mirror"),
        (!spec.always.is_empty(), "spec.always"),
        (!spec.never.is_empty(), "spec.never"),
        (spec.ramp.is_some(), "spec.ramp"),
        (!spec.gateways.is_empty(), "spec.gateways"),
        (spec.virtual_service.is_some(), "spec.virtualService"),
        (spec.destination_rule.is_some(), "spec.destinationRule"),
    ];
    match unsupported.iter().find(|(set, _)| *set) {
        Some((_, what)) => Err(Block::UnsupportedByRouter {
            router: "Replicas".into(),
            what: (*what).into(),
            why: "the Replicas router has no routes: the Service spreads every request over the target's and the clone's pods alike".into(),
        }),
        None => Ok(()),
    }
}

/// Clone replicas beside `target` replicas so that their share of the endpoints never exceeds
/// `percent`: `floor(target × p / (100 − p))`, at most `max`. At 100 % the clone matches the
/// target (half of the endpoints): the target's pods keep serving.
pub(in crate::planner) fn replicas_for(target: i32, percent: i32, max: Option<i32>) -> i32 {
    let (n, p) = (i64::from(target.max(0)), i64::from(percent.clamp(0, 100)));
    let r = if p >= 100 { n } else { n * p / (100 - p) };
    let r = i32::try_from(r).unwrap_or(i32::MAX);
    max.map_or(r, |m| r.min(m.max(0)))
}

/// One clone pod's share beside `target` target pods, in percent (rounded down).
fn one_pod(target: i32) -> i32 {
    100 / (target.max(0) + 1)
}

/// The Service's Ready endpoints: (the clone's, the rest).
fn endpoints(b: &Builder) -> (i32, i32) {
    let o = b.o;
    let clone = o.canary.spec.clone_name();
    let count = |of_clone: bool| {
        o.pods
            .iter()
            .filter(|p| {
                p.serving()
                    && pod_of_deployment(p, &clone) == of_clone
                    && o.endpoints
                        .contains(p.metadata.name.as_deref().unwrap_or_default())
            })
            .count()
    };
    let n = |c: usize| i32::try_from(c).unwrap_or(i32::MAX);
    (n(count(true)), n(count(false)))
}

/// Progress: the clone sized for `percent` of the target's replicas that are both asked for and
/// Ready endpoints now (so a target that scales down, as an HPA does, shrinks the clone at once,
/// and one that scales up grows it only once its own new pods are endpoints), the share read
/// back from the endpoints.
pub(in crate::planner) fn plan_progress(mut b: Builder, k: &Checked, health: CloneHealth) -> Plan {
    let spec = &k.spec;
    let target_replicas = k.target.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let (clone, others) = endpoints(&b);
    let want = replicas_for(target_replicas, spec.percent, spec.max_replicas);
    let now = replicas_for(target_replicas.min(others), spec.percent, spec.max_replicas);
    b.status.target_replicas = target_replicas;
    b.status.clone_replicas = now;
    b.status.clone_ready_replicas = safety::clone_ready_pods(&b);
    let total = clone + others;
    b.status.current_percent = if total == 0 {
        0
    } else {
        i32::try_from(i64::from(clone) * 100 / i64::from(total)).unwrap_or(0)
    };
    crate::planner::progress::sync_clone(&mut b, k, now);
    report(
        b,
        k,
        health,
        Sizes {
            want,
            now,
            clone,
            others,
        },
    )
}

/// The clone's sizes and the Service's Ready endpoints.
struct Sizes {
    /// For the target's replicas as asked for.
    want: i32,
    /// For those that are Ready endpoints now too.
    now: i32,
    /// The clone's Ready endpoints.
    clone: i32,
    /// The other Ready endpoints (the target's).
    others: i32,
}

/// What to report: Ready once the clone's endpoints are what it was sized for; how coarse the
/// share is at this size.
fn report(mut b: Builder, k: &Checked, health: CloneHealth, z: Sizes) -> Plan {
    let percent = k.spec.percent;
    let target_replicas = b.status.target_replicas;
    let current = b.status.current_percent;
    let clone_name = b.o.canary.spec.clone_name();
    let service = &k.host.name;
    let step = one_pod(target_replicas);
    let coarse = format!(
        "beside {target_replicas} target replicas one clone pod is {step}% of the Service's endpoints, so the share moves in steps of about {step} points"
    );
    b.condition("ShareGranularity", true, "OnePodStep", &coarse);
    let (phase, reason, message) = if percent > 0 && z.want == 0 {
        let message = format!(
            "{coarse}: more than {percent}%, so no clone pod runs (at {percent}% one clone pod needs at least {} target replicas)",
            (100 - percent + percent.max(1) - 1) / percent.max(1)
        );
        if b.reason_changed("ShareTooCoarse") {
            b.event(true, "ShareTooCoarse", message.clone());
        }
        (Phase::Progressing, "ShareTooCoarse", message)
    } else if z.now < z.want {
        (
            Phase::Progressing,
            "WaitingForTargetEndpoints",
            format!(
                "{} of {target_replicas} target replicas are Ready endpoints of Service {service}; {clone_name} grows to {} replicas once they all are, so that its share never passes {percent}%",
                z.others, z.want
            ),
        )
    } else if percent > 0 && !health.healthy() && z.clone == 0 {
        (
            Phase::Progressing,
            "WaitingForClone",
            format!(
                "Waiting for {} replica(s) of {clone_name} that are Ready endpoints of Service {service}",
                z.now
            ),
        )
    } else if z.clone < z.now {
        (
            Phase::Progressing,
            "WaitingForCloneEndpoints",
            format!(
                "{} of {} replicas of {clone_name} are Ready endpoints of Service {service}; the clone has {current}% of its endpoints (target {percent}%)",
                z.clone, z.now
            ),
        )
    } else {
        (
            Phase::Ready,
            "ShareReached",
            format!(
                "{} of the {} Ready endpoints of Service {service} are the clone's: {current}% of its requests (target {percent}%)",
                z.clone,
                z.clone + z.others
            ),
        )
    };
    b.report(phase, reason, &message);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clone_is_sized_so_that_its_share_never_exceeds_the_percent() {
        assert_eq!(replicas_for(9, 10, None), 1, "1 beside 9 is 10 %");
        assert_eq!(replicas_for(8, 10, None), 0, "1 beside 8 would be 11 %");
        assert_eq!(replicas_for(3, 10, None), 0);
        assert_eq!(replicas_for(3, 25, None), 1, "1 beside 3 is 25 %");
        assert_eq!(replicas_for(10, 50, None), 10);
        assert_eq!(replicas_for(10, 100, None), 10);
        assert_eq!(replicas_for(90, 10, Some(5)), 5);
        assert_eq!(replicas_for(9, 0, None), 0);
        for n in 0..50 {
            for p in 0..100 {
                let r = replicas_for(n, p, None);
                assert!(
                    i64::from(r) * 100 <= i64::from(p) * i64::from(n + r),
                    "{r} beside {n} exceeds {p}%"
                );
                // The largest such size: one more would exceed.
                assert!(
                    i64::from(r + 1) * 100 > i64::from(p) * i64::from(n + r + 1),
                    "{r} beside {n} at {p}% is not the largest"
                );
            }
        }
        assert_eq!(one_pod(9), 10);
    }
}
