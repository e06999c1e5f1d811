use super::*;
use gpuscale_crds::{ResourcesSpec, WorkerSpec};

fn rev(name: &str) -> Revision {
    Revision {
        name: name.into(),
        model: serde_json::from_value(
            serde_json::json!({"name": "m", "source": "file:///models/m.gguf"}),
        )
        .unwrap(),
        resources: ResourcesSpec::default(),
        worker: WorkerSpec::default(),
        need_bytes: 1 << 30,
    }
}

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn spec() -> RolloutSpec {
    RolloutSpec {
        step_seconds: 60,
        min_requests: 10,
        ..RolloutSpec::default()
    }
}

fn obs<'a>(r: &'a Revision, now: i64, ready: u32, window: Option<Window>) -> Observed<'a> {
    Observed {
        revision: r,
        desired: 4,
        canary_ready: ready,
        canary_failure: None,
        window,
        routed: true,
        now: at(now),
    }
}

fn measured(requests: f64, errors: f64, ttft: f64) -> Measured {
    Measured {
        requests,
        errors,
        ttft_p95: Some(ttft),
        itl_p95: Some(0.02),
    }
}

fn window(since: i64, stable: Measured, canary: Measured) -> Option<Window> {
    Some(Window {
        stable,
        canary,
        since: at(since),
    })
}

#[test]
fn split_gives_each_version_replicas_in_proportion_within_the_surge() {
    // 10% of 4 rounds up to one canary; the stable version keeps its 4 (surge 1).
    assert_eq!(split(4, 10, 1), (4, 1));
    // Half and half: no canary replica is busier than a stable one.
    assert_eq!(split(4, 50, 1), (2, 2));
    assert_eq!(split(2, 50, 1), (1, 1));
    assert_eq!(split(3, 50, 1), (2, 2));
    // Two replicas at 40%: one canary would carry 40 to a stable replica's 30.
    assert_eq!(split(2, 40, 1), (1, 2));
    assert_eq!(split(4, 100, 1), (0, 4));
    // maxSurge 0: the two add up to the desired count.
    assert_eq!(split(4, 10, 0), (3, 1));
    assert_eq!(split(1, 10, 0), (0, 1));
    assert_eq!(split(0, 50, 1), (0, 0));
    // Scaling during a rollout scales both versions in proportion.
    assert_eq!(split(10, 50, 1), (5, 5));
    assert_eq!(split(20, 10, 1), (18, 2));
    // Within the surge always; and up to an even split, no canary replica carries more
    // than a stable one, so its latency is never judged under more load than the
    // version it is compared with.
    for surge in [0, 1, 3] {
        for desired in 1..=40 {
            for percent in 1..=100 {
                let (s, c) = split(desired, percent, surge);
                let at = format!("{desired} at {percent}% (surge {surge}): {s} stable, {c} canary");
                assert!(
                    s + c <= desired + surge && (1..=desired).contains(&c),
                    "{at}"
                );
                if s > 0 && percent <= 50 {
                    assert!(percent * s <= (100 - percent) * c, "{at}");
                }
            }
        }
    }
}

#[test]
fn a_good_version_steps_through_every_share_and_is_promoted() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = spec();
    let first = advance(&s, None, &obs(&a, 0, 0, None));
    assert_eq!(first.status.phase, RolloutPhase::Stable);
    let started = advance(&s, Some(&first.status), &obs(&b, 10, 0, None));
    assert_eq!(started.status.phase, RolloutPhase::Progressing);
    assert_eq!(started.event.as_ref().unwrap().reason, "RolloutStarted");
    assert_eq!(started.status.canary_weight, 0);
    let mut st = started.status;
    let mut now = 20;
    for (i, share) in [10, 50, 100].into_iter().enumerate() {
        let wanted = split(4, share, 1).1;
        // Not ready yet: no traffic moves.
        let o = advance(&s, Some(&st), &obs(&b, now, wanted - 1, None));
        assert_eq!(o.status.canary_weight, st.canary_weight);
        // Ready: the share is routed and the window starts.
        let o = advance(&s, Some(&st), &obs(&b, now + 5, wanted, None));
        assert_eq!(o.status.canary_weight, share);
        assert_eq!(o.status.step as usize, i);
        st = o.status;
        let good = window(
            now + 5,
            measured(100.0, 1.0, 0.2),
            measured(50.0, 0.0, 0.21),
        );
        // Held less than stepSeconds: stays.
        let o = advance(&s, Some(&st), &obs(&b, now + 30, wanted, good));
        assert_eq!(o.status, {
            let mut x = st.clone();
            x.canary = Some(b.clone());
            x
        });
        let o = advance(&s, Some(&st), &obs(&b, now + 70, wanted, good));
        st = o.status;
        now += 100;
    }
    assert_eq!(st.phase, RolloutPhase::Stable);
    assert_eq!(st.stable.name, "bbbb");
    assert!(st.message.unwrap().contains("promoted"));
}

#[test]
fn errors_above_the_limit_roll_back_early_and_pin_the_old_version() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = spec();
    let st = advance(&s, Some(&stable(&a)), &obs(&b, 0, 0, None)).status;
    let st = advance(&s, Some(&st), &obs(&b, 5, 1, None)).status;
    assert_eq!(st.canary_weight, 10);
    // Fewer answers than minRequests: no early verdict.
    let few = window(5, measured(90.0, 0.0, 0.2), measured(5.0, 3.0, 0.2));
    assert_eq!(advance(&s, Some(&st), &obs(&b, 10, 1, few)).event, None);
    let bad = window(5, measured(180.0, 0.0, 0.2), measured(20.0, 6.0, 0.2));
    let o = advance(&s, Some(&st), &obs(&b, 15, 1, bad));
    assert_eq!(o.status.phase, RolloutPhase::RolledBack);
    assert_eq!(o.status.canary_weight, 0);
    let e = o.event.unwrap();
    assert_eq!(e.reason, "RolledBack");
    assert!(
        e.message.contains("6 of 20 requests (30.0%"),
        "{}",
        e.message
    );
    // Pinned while the spec still asks for the failed version ...
    let again = advance(&s, Some(&o.status), &obs(&b, 500, 0, None));
    assert_eq!(again.status.phase, RolloutPhase::RolledBack);
    assert_eq!(again.event, None);
    // ... and a new change starts a new rollout.
    let c = rev("cccc");
    let next = advance(&s, Some(&o.status), &obs(&c, 600, 0, None));
    assert_eq!(next.status.phase, RolloutPhase::Progressing);
    assert_eq!(next.status.stable.name, "aaaa");
}

#[test]
fn slower_than_the_stable_version_over_the_same_window_rolls_back() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = spec();
    let st = advance(&s, Some(&stable(&a)), &obs(&b, 0, 0, None)).status;
    let st = advance(&s, Some(&st), &obs(&b, 5, 1, None)).status;
    let slow = window(5, measured(100.0, 0.0, 0.2), measured(20.0, 0.0, 0.31));
    let o = advance(&s, Some(&st), &obs(&b, 20, 1, slow));
    assert_eq!(o.status.phase, RolloutPhase::RolledBack);
    assert!(o
        .event
        .unwrap()
        .message
        .contains("p95 time to first token 310 ms"));
    // Within the factor (1.5x): no verdict before the hold ends.
    let ok = window(5, measured(100.0, 0.0, 0.2), measured(20.0, 0.0, 0.29));
    assert_eq!(advance(&s, Some(&st), &obs(&b, 20, 1, ok)).event, None);
}

#[test]
fn replicas_that_never_become_ready_or_crash_roll_back() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = RolloutSpec {
        ready_timeout_seconds: 120,
        ..spec()
    };
    let st = advance(&s, Some(&stable(&a)), &obs(&b, 0, 0, None)).status;
    assert_eq!(advance(&s, Some(&st), &obs(&b, 100, 0, None)).event, None);
    let o = advance(&s, Some(&st), &obs(&b, 130, 0, None));
    assert_eq!(o.status.phase, RolloutPhase::RolledBack);
    assert!(o.event.unwrap().message.contains("0 of 1 replicas"));
    let mut crashed = obs(&b, 10, 0, None);
    crashed.canary_failure = Some("CrashLoopBackOff: not a GGUF file".into());
    let o = advance(&s, Some(&st), &crashed);
    assert_eq!(o.status.phase, RolloutPhase::RolledBack);
}

#[test]
fn a_restart_resumes_at_the_same_step_with_a_fresh_window() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = spec();
    let st = advance(&s, Some(&stable(&a)), &obs(&b, 0, 0, None)).status;
    let st = advance(&s, Some(&st), &obs(&b, 5, 1, None)).status;
    // The restarted operator's window starts at 200 (its first reading): at 210 the
    // step has held only 10 s of what it can judge, though it began at 5.
    let fresh = window(200, measured(10.0, 0.0, 0.2), measured(2.0, 0.0, 0.2));
    let o = advance(&s, Some(&st), &obs(&b, 210, 1, fresh));
    assert_eq!(o.status.step, 0);
    assert_eq!(o.status.canary_weight, 10);
    assert_eq!(o.event, None);
    let o = advance(&s, Some(&st), &obs(&b, 261, 1, fresh));
    assert_eq!(o.status.step, 1);
}

#[test]
fn without_routers_the_new_version_replaces_the_old_when_ready() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = spec();
    let mut o = obs(&b, 0, 0, None);
    o.routed = false;
    let st = advance(&s, Some(&stable(&a)), &o).status;
    assert!(st.message.as_ref().unwrap().contains("no request router"));
    o.canary_ready = 3;
    assert_eq!(
        advance(&s, Some(&st), &o).status.phase,
        RolloutPhase::Progressing
    );
    o.canary_ready = 4;
    let p = advance(&s, Some(&st), &o);
    assert_eq!(p.status.phase, RolloutPhase::Stable);
    assert_eq!(p.status.stable.name, "bbbb");
}

#[test]
fn the_spec_back_at_the_stable_version_abandons_the_rollout() {
    let (a, b) = (rev("aaaa"), rev("bbbb"));
    let s = spec();
    let st = advance(&s, Some(&stable(&a)), &obs(&b, 0, 0, None)).status;
    let o = advance(&s, Some(&st), &obs(&a, 5, 0, None));
    assert_eq!(o.status.phase, RolloutPhase::Stable);
    assert_eq!(o.event.unwrap().reason, "RolloutAbandoned");
}
