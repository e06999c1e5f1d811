//! Frontiers of SLO misses against GPU-seconds: each rule replayed over a sweep of its
//! settings gives points; the Pareto frontier keeps those no cheaper setting beats.
//! One rule dominates another when, at every GPU-seconds budget the other's frontier
//! reaches, it has a setting that costs no more and misses fewer requests: a better
//! policy, not a different setting of the same trade.
//!
//! The grid below is what the frontier benchmark (`operator/benches/frontier.rs`) and
//! `gpuscale-operator plan` sweep; [`sweep`] is the planner's: the three rules on the
//! user's trace, gpuscale at the rest of the user's spec.

use std::fmt::Write as _;
use std::time::Duration;

use super::{replay, GpuscaleRule, HpaRule, KedaRule, Outcome, ScalingRule, Setup, Trace};
use crate::autoscale::Params;

/// Scale-down windows swept, seconds, the same for every rule.
pub const WINDOWS: [f64; 5] = [30.0, 60.0, 120.0, 300.0, 600.0];
/// Queue depth per replica swept (gpuscale's target, KEDA's threshold). Up to 256: from
/// 96 on, every rule holds one replica for the whole Azure code trace, the least any
/// rule can spend, so each frontier reaches that floor (where all rules tie) rather
/// than stopping where the grid did. 56 and 80 fill the step between 48 and 96, where
/// the cheapest settings that ever scale lie.
pub const QUEUES: [u32; 17] = [
    2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 56, 64, 80, 96, 128, 192, 256,
];
/// Scale-up windows swept, seconds, the same for every rule: the HPA's
/// `behavior.scaleUp.stabilizationWindowSeconds` (0 by default; KEDA passes it to the
/// HPA it creates) and gpuscale's `scaleUpWindowSeconds` (0 by default), each the
/// lowest recommendation of the window. gpuscale's `panicWindowSeconds` is not swept
/// (the spec's, 6 s by default): sweeping 6–60 s as well (four times the replays; one
/// phase, one bursty draw) left 9 Azure and 8 bursty KEDA points undominated instead
/// of 10 and 9, none where 90% meet the SLO. 120 s and 180 s: a window longer than
/// most bursts lets a rule ride them out (the cheap settings of bursty load). Of the
/// KEDA points where 90% meet the SLO on the bursty draws, 3 were undominated without
/// them and without [`LEARNED_WINDOW`]'s `Fixed`, 1 with them alone, none with both.
pub const UP_WINDOWS: [f64; 6] = [0.0, 15.0, 30.0, 60.0, 120.0, 180.0];
/// gpuscale's `scaleDownWindowMode` swept: `Adaptive` (the window learned from
/// reversed scale-downs, [`Params::learn_window`]) and `Fixed`.
pub const LEARNED_WINDOW: [bool; 2] = [true, false];
/// The HPA-style rule's utilisation targets swept.
pub const UTILISATIONS: [f64; 6] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95];
/// gpuscale's `warmReplicas` swept.
pub const WARM: [u32; 3] = [0, 1, 2];
/// Phases of each rule's interval its first decision falls at
/// ([`Setup::tick_phase`]): where one or two replicas decide the outcome, a burst one
/// sync sees and the next misses moves a setting's misses by hundreds, so each setting
/// is replayed at each and its point is their mean.
pub const PHASES: [f64; 5] = [0.0, 0.2, 0.4, 0.6, 0.8];
/// Phases none of [`PHASES`] is: a frontier's settings are chosen by their means over
/// [`PHASES`], and a mean chosen as the least of many noisy ones is low by the choice
/// (the winner's curse), the more so the noisier the rule. Replayed at these (and, for a
/// synthetic process, on draws the sweep did not use), the chosen settings are met as a
/// user meets them: on runs they were not chosen on.
pub const HELD_OUT_PHASES: [f64; 5] = [0.1, 0.3, 0.5, 0.7, 0.9];
/// gpuscale's scrape interval in the replay, seconds.
pub const GPUSCALE_INTERVAL: f64 = 2.0;

/// Replays one setting on each trace at each of [`PHASES`], with a fresh rule from
/// `rule` each time: `[trace][phase]`. Timelines are dropped: a sweep keeps only the
/// totals, so its memory stays flat.
pub fn runs<R: ScalingRule>(
    traces: &[Trace],
    setup: &Setup,
    rule: impl Fn() -> R,
) -> Vec<Vec<Outcome>> {
    runs_at(traces, setup, &PHASES, rule)
}

/// [`runs`] at the given phases instead of [`PHASES`].
pub fn runs_at<R: ScalingRule>(
    traces: &[Trace],
    setup: &Setup,
    phases: &[f64],
    rule: impl Fn() -> R,
) -> Vec<Vec<Outcome>> {
    traces
        .iter()
        .map(|trace| {
            phases
                .iter()
                .map(|&tick_phase| {
                    let at = Setup {
                        tick_phase,
                        ..setup.clone()
                    };
                    let mut o = replay(trace, &at, &mut rule());
                    o.timeline = Vec::new();
                    o
                })
                .collect()
        })
        .collect()
}

/// One setting of a rule, replayed at one or more phases of its sync ([`super::Setup::tick_phase`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The setting, for the report ("queue 4, 300 s").
    pub setting: String,
    /// GPU-seconds used, the mean over the phases.
    pub gpu_seconds: f64,
    /// Requests over the SLO (refused included), the mean over the phases.
    pub slo_misses: f64,
    /// The fewest and the most requests over the SLO at one phase.
    pub misses_range: (usize, usize),
    /// Cold starts, the mean.
    pub cold_starts: f64,
    /// Flaps per hour, the mean.
    pub flaps_per_hour: f64,
}

impl Point {
    /// The point of one setting's replays (one per phase): their means, and the
    /// spread of the misses.
    ///
    /// # Panics
    ///
    /// With no replay.
    pub fn of(setting: impl Into<String>, replays: &[Outcome]) -> Point {
        assert!(!replays.is_empty(), "a point needs a replay");
        let n = replays.len() as f64;
        let mean = |f: &dyn Fn(&Outcome) -> f64| replays.iter().map(f).sum::<f64>() / n;
        let misses = replays.iter().map(|o| o.slo_misses);
        Point {
            setting: setting.into(),
            gpu_seconds: mean(&|o| o.gpu_seconds),
            slo_misses: mean(&|o| o.slo_misses as f64),
            misses_range: (
                misses.clone().min().unwrap_or_default(),
                misses.max().unwrap_or_default(),
            ),
            cold_starts: mean(&|o| o.cold_starts as f64),
            flaps_per_hour: mean(&Outcome::flaps_per_hour),
        }
    }

    /// The fewest and most misses of one run, as the reports print them ("4-10").
    pub fn spread(&self) -> String {
        format!("{}-{}", self.misses_range.0, self.misses_range.1)
    }
}

/// The frontier of `points` as a table, one line per point, cheapest first; `runs`
/// heads the column of [`Point::spread`] (what one run is: "(phases)", "(runs)").
pub fn table(points: &[Point], runs: &str) -> String {
    let mut out = format!(
        "  {:>11} {:>9} {:>11} {:>6} {:>8}  setting\n",
        "GPU-seconds", "over SLO", runs, "cold", "flaps/h"
    );
    for p in frontier(points) {
        let _ = writeln!(
            out,
            "  {:>11.0} {:>9.1} {:>11} {:>6.1} {:>8.1}  {}",
            p.gpu_seconds,
            p.slo_misses,
            p.spread(),
            p.cold_starts,
            p.flaps_per_hour,
            p.setting
        );
    }
    out
}

/// The Pareto frontier: by GPU-seconds ascending, each point missing strictly fewer
/// requests than every cheaper one.
pub fn frontier(points: &[Point]) -> Vec<Point> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| {
        a.gpu_seconds
            .total_cmp(&b.gpu_seconds)
            .then(a.slo_misses.total_cmp(&b.slo_misses))
    });
    let mut out: Vec<Point> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|l| p.slo_misses < l.slo_misses) {
            out.push(p);
        }
    }
    out
}

/// The point of `front` (a [`frontier`]) with the fewest misses that costs no more than
/// `budget`: the costliest within it, since a frontier's misses fall as its cost rises.
fn best_within(front: &[Point], budget: f64) -> Option<&Point> {
    front.iter().take_while(|p| p.gpu_seconds <= budget).last()
}

/// Where `ours` fails to dominate `peer`: each frontier point of `peer` at whose budget
/// `ours` has no setting that costs no more and misses fewer (or none, where the peer
/// misses none too: nothing is fewer than zero), with our best setting
/// within that budget (`None`: we have no setting that cheap). Empty: `ours` dominates.
pub fn undominated(ours: &[Point], peer: &[Point]) -> Vec<(Point, Option<Point>)> {
    let ours = frontier(ours);
    frontier(peer)
        .into_iter()
        .filter_map(|p| {
            let best = best_within(&ours, p.gpu_seconds).cloned();
            // Fewer, or none at all where the peer misses none either.
            match &best {
                Some(b) if b.slo_misses < p.slo_misses || b.slo_misses == 0.0 => None,
                _ => Some((p, best)),
            }
        })
        .collect()
}

/// How much of a peer's range of budgets `ours` wins where it does not dominate: the
/// size of a gap, where [`undominated`] lists only its points. A frontier is a step
/// function of the budget (the fewest misses of any setting that costs no more); the
/// two are compared at every budget from the peer's cheapest frontier point to the
/// costlier of the two frontiers' last points (beyond it neither changes).
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetShare {
    /// The budgets compared, GPU-seconds.
    pub range: (f64, f64),
    /// Shares of the range where ours misses fewer, more (or has no setting that
    /// cheap), and as many; they sum to 1. Measured on a log scale of the budget,
    /// so that 10% more GPU-seconds weighs the same at either end: on a linear scale the
    /// expensive settings, where gpuscale wins, would drown the cheap end.
    pub fewer: f64,
    /// See `fewer`.
    pub more: f64,
    /// See `fewer`.
    pub tie: f64,
    /// The most ours misses over the peer at one budget where both have a setting, and
    /// the cheapest budget where it does: `(budget, excess)`.
    pub worst: Option<(f64, f64)>,
}

/// [`BudgetShare`] of `ours` against `peer`; `None` when the range is empty (one
/// budget, or none that is positive).
pub fn budget_share(ours: &[Point], peer: &[Point]) -> Option<BudgetShare> {
    let (ours, peer) = (frontier(ours), frontier(peer));
    let lo = peer.first()?.gpu_seconds;
    let hi = peer
        .iter()
        .chain(&ours)
        .map(|p| p.gpu_seconds)
        .fold(lo, f64::max);
    if lo <= 0.0 || hi <= lo {
        return None;
    }
    let mut cuts: Vec<f64> = peer
        .iter()
        .chain(&ours)
        .map(|p| p.gpu_seconds)
        .filter(|&g| g > lo && g < hi)
        .collect();
    cuts.extend([lo, hi]);
    cuts.sort_by(f64::total_cmp);
    cuts.dedup();
    let (mut fewer, mut more, mut tie) = (0.0, 0.0, 0.0);
    let mut worst: Option<(f64, f64)> = None;
    for w in cuts.windows(2) {
        let (from, to) = (w[0], w[1]);
        let weight = (to / from).ln();
        let theirs = best_within(&peer, from).map_or(f64::INFINITY, |p| p.slo_misses);
        match best_within(&ours, from).map(|p| p.slo_misses) {
            Some(m) if m < theirs => fewer += weight,
            Some(m) if m == theirs => tie += weight,
            Some(m) => {
                more += weight;
                if worst.is_none_or(|(_, e)| m - theirs > e) {
                    worst = Some((from, m - theirs));
                }
            }
            None => more += weight,
        }
    }
    let all = (hi / lo).ln();
    Some(BudgetShare {
        range: (lo, hi),
        fewer: fewer / all,
        more: more / all,
        tie: tie / all,
        worst,
    })
}

impl std::fmt::Display for BudgetShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "of the budgets from {:.0} to {:.0} GPU-s (on a log scale), gpuscale misses fewer at {:.1}%, more at {:.1}%",
            self.range.0,
            self.range.1,
            self.fewer * 100.0,
            self.more * 100.0
        )?;
        if let Some((at, excess)) = self.worst {
            write!(f, " (at most {excess:.1} more, at {at:.0} GPU-s)")?;
        }
        write!(f, ", as many at {:.1}%", self.tie * 100.0)
    }
}

/// A setting of one of the three rules, as the planner sweeps them.
#[derive(Clone, Debug)]
enum Setting {
    Gpuscale(Params),
    Hpa {
        utilisation: f64,
        down: f64,
        up: f64,
    },
    Keda {
        threshold: u32,
        down: f64,
        up: f64,
    },
}

impl Setting {
    /// How the report names it: gpuscale's in the spec's field names, so a user can
    /// copy it.
    fn label(&self) -> String {
        match self {
            Setting::Gpuscale(p) => format!(
                "targetQueueDepth {}, warmReplicas {}, scaleDownWindowSeconds {}, scaleUpWindowSeconds {}{}",
                p.target,
                p.warm,
                p.down_window.as_secs(),
                p.up_window.as_secs(),
                if p.learn_window {
                    ""
                } else {
                    ", scaleDownWindowMode Fixed"
                }
            ),
            Setting::Hpa {
                utilisation,
                down,
                up,
            } => format!("{:.0}% busy, {down} s, up {up} s", utilisation * 100.0),
            Setting::Keda {
                threshold,
                down,
                up,
            } => format!("queue {threshold}, {down} s, up {up} s"),
        }
    }

    /// Its point: the mean of its replays at each of [`PHASES`].
    fn point(&self, trace: &Trace, setup: &Setup, (min, max): (u32, u32)) -> Point {
        let traces = std::slice::from_ref(trace);
        let runs = match self {
            Setting::Gpuscale(p) => runs(traces, setup, || {
                GpuscaleRule::new(p.clone(), GPUSCALE_INTERVAL)
            }),
            &Setting::Hpa {
                utilisation,
                down,
                up,
            } => runs(traces, setup, || {
                HpaRule::new(min, max, utilisation)
                    .with_window(down)
                    .with_up_window(up)
            }),
            &Setting::Keda {
                threshold,
                down,
                up,
            } => runs(traces, setup, || {
                KedaRule::new(min, max, f64::from(threshold))
                    .with_window(down)
                    .with_up_window(up)
            }),
        };
        Point::of(self.label(), &runs.concat())
    }
}

/// The planner's sweep of one trace: each rule's points over the grid, and the spec's
/// own setting.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// gpuscale over [`QUEUES`] × [`WARM`] × [`WINDOWS`] × [`UP_WINDOWS`] ×
    /// [`LEARNED_WINDOW`], the rest (bounds, panic window, `predictive`, scale to zero)
    /// as the spec says.
    pub gpuscale: Vec<Point>,
    /// The HPA-style rule over [`UTILISATIONS`] × [`WINDOWS`] × [`UP_WINDOWS`].
    pub hpa: Vec<Point>,
    /// The KEDA-style rule over [`QUEUES`] × [`WINDOWS`] × [`UP_WINDOWS`].
    pub keda: Vec<Point>,
    /// The spec's own setting, replayed the same way.
    pub spec: Point,
}

/// Sweeps the three rules over the grid on `trace` (each setting at each of [`PHASES`]),
/// gpuscale with the rest of `spec`, the peers within its bounds. Pure; the settings are
/// spread over `threads` threads (at least one).
pub fn sweep(trace: &Trace, setup: &Setup, spec: &Params, threads: usize) -> Sweep {
    let bounds = (spec.min.max(1), spec.max);
    let mut settings = Vec::new();
    for down in WINDOWS {
        for up in UP_WINDOWS {
            for threshold in QUEUES {
                for (warm, learn_window) in WARM
                    .into_iter()
                    .flat_map(|w| LEARNED_WINDOW.map(|l| (w, l)))
                {
                    settings.push(Setting::Gpuscale(Params {
                        target: f64::from(threshold),
                        warm,
                        down_window: Duration::from_secs_f64(down),
                        up_window: Duration::from_secs_f64(up),
                        learn_window,
                        ..spec.clone()
                    }));
                }
                settings.push(Setting::Keda {
                    threshold,
                    down,
                    up,
                });
            }
            for utilisation in UTILISATIONS {
                settings.push(Setting::Hpa {
                    utilisation,
                    down,
                    up,
                });
            }
        }
    }
    // Each thread takes every `threads`-th setting, so the costly ones (low targets,
    // many replicas) are spread evenly.
    let threads = threads.clamp(1, settings.len());
    let mut points: Vec<Option<Point>> = vec![None; settings.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let settings = &settings;
                scope.spawn(move || {
                    (t..settings.len())
                        .step_by(threads)
                        .map(|i| (i, settings[i].point(trace, setup, bounds)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (i, p) in h.join().expect("a replay thread panicked") {
                points[i] = Some(p);
            }
        }
    });
    let mut out = Sweep {
        gpuscale: Vec::new(),
        hpa: Vec::new(),
        keda: Vec::new(),
        spec: Setting::Gpuscale(spec.clone()).point(trace, setup, bounds),
    };
    for (setting, point) in settings.iter().zip(points) {
        let point = point.expect("every setting replayed");
        match setting {
            Setting::Gpuscale(_) => out.gpuscale.push(point),
            Setting::Hpa { .. } => out.hpa.push(point),
            Setting::Keda { .. } => out.keda.push(point),
        }
    }
    out
}

/// A gpuscale setting on the frontier of `points` that beats `spec` outright: the one
/// with the fewest misses within the spec's budget if it misses fewer, else the
/// cheapest that misses no more for less. `None`: nothing beats the spec's setting.
pub fn better_than(points: &[Point], spec: &Point) -> Option<Point> {
    let front = frontier(points);
    if let Some(p) =
        best_within(&front, spec.gpu_seconds).filter(|p| p.slo_misses < spec.slo_misses)
    {
        return Some(p.clone());
    }
    front
        .iter()
        .find(|p| p.slo_misses <= spec.slo_misses && p.gpu_seconds < spec.gpu_seconds)
        .cloned()
}

impl Sweep {
    /// The planner's report: each rule's frontier, whether gpuscale's dominates each
    /// peer's on this trace (and where not, how many of those points miss no more than
    /// `allowed`, the user's objective), and whether a setting beats the spec's.
    pub fn report(&self, allowed: usize) -> String {
        let mut out = String::new();
        for (name, points) in [
            ("gpuscale", &self.gpuscale),
            ("HPA-style", &self.hpa),
            ("KEDA-style", &self.keda),
        ] {
            let _ = writeln!(
                out,
                "{name} frontier ({} settings, each the mean of {} sync phases):",
                points.len(),
                PHASES.len()
            );
            out.push_str(&table(points, "(phases)"));
        }
        for (name, peer) in [("HPA-style", &self.hpa), ("KEDA-style", &self.keda)] {
            let gaps = undominated(&self.gpuscale, peer);
            if gaps.is_empty() {
                let _ = writeln!(
                    out,
                    "gpuscale dominates {name} on this trace: at every budget its frontier reaches, a gpuscale setting misses fewer"
                );
                continue;
            }
            let meet = gaps
                .iter()
                .filter(|(p, _)| p.slo_misses <= allowed as f64)
                .count();
            let _ = writeln!(
                out,
                "gpuscale does not dominate {name} on this trace at {} of its {} frontier points ({meet} of them within the objective's {allowed} misses):",
                gaps.len(),
                frontier(peer).len()
            );
            for (p, ours) in gaps {
                let _ = match ours {
                    Some(o) => writeln!(
                        out,
                        "  {} at {:.0} GPU-s misses {:.1}; gpuscale's best within that budget misses {:.1} ({})",
                        p.setting, p.gpu_seconds, p.slo_misses, o.slo_misses, o.setting
                    ),
                    None => writeln!(
                        out,
                        "  {} at {:.0} GPU-s misses {:.1}; gpuscale has no setting that cheap",
                        p.setting, p.gpu_seconds, p.slo_misses
                    ),
                };
            }
            if let Some(share) = budget_share(&self.gpuscale, peer) {
                let _ = writeln!(out, "Against {name}: {share}.");
            }
        }
        let spec = &self.spec;
        let _ = write!(
            out,
            "The spec's setting ({}): {:.0} GPU-s, {:.1} over the SLO; ",
            spec.setting, spec.gpu_seconds, spec.slo_misses
        );
        let _ = match better_than(&self.gpuscale, spec) {
            Some(b) => writeln!(
                out,
                "{} does better on this trace: {:.0} GPU-s, {:.1} over the SLO.",
                b.setting, b.gpu_seconds, b.slo_misses
            ),
            None => writeln!(
                out,
                "no setting of the grid costs no more and misses fewer, or misses no more for less."
            ),
        };
        // The frontier is cheapest first: the first point within the objective is the
        // cheapest setting that meets it.
        let _ = match frontier(&self.gpuscale)
            .into_iter()
            .find(|p| p.slo_misses <= allowed as f64)
        {
            Some(p) => writeln!(
                out,
                "The cheapest setting of the grid that meets the objective (at most {allowed} over the SLO): {}: {:.0} GPU-s, {:.1} over the SLO.",
                p.setting, p.gpu_seconds, p.slo_misses
            ),
            None => writeln!(
                out,
                "No setting of the grid meets the objective (at most {allowed} over the SLO) within the spec's bounds."
            ),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::synthetic::Bursty;
    use crate::replay::{ReplicaModel, Slo};

    fn p(g: f64, m: usize) -> Point {
        let o = Outcome {
            gpu_seconds: g,
            slo_misses: m,
            ..Outcome::default()
        };
        Point::of(format!("{g}/{m}"), &[o])
    }

    #[test]
    fn the_frontier_keeps_only_settings_no_cheaper_one_beats() {
        let f = frontier(&[
            p(10.0, 50),
            p(12.0, 60),
            p(8.0, 90),
            p(15.0, 20),
            p(15.0, 25),
        ]);
        let kept: Vec<(f64, f64)> = f.iter().map(|p| (p.gpu_seconds, p.slo_misses)).collect();
        assert_eq!(kept, [(8.0, 90.0), (10.0, 50.0), (15.0, 20.0)]);
    }

    #[test]
    fn dominance_needs_fewer_misses_at_every_budget_the_peer_reaches() {
        let ours = [p(8.0, 40), p(12.0, 10)];
        assert!(undominated(&ours, &[p(9.0, 60), p(13.0, 30)]).is_empty());
        // Zero against zero: nothing is fewer.
        assert!(undominated(&[p(8.0, 0)], &[p(9.0, 0)]).is_empty());
        // Equal misses is not fewer; a budget below all of ours is not covered.
        let misses = undominated(&ours, &[p(7.0, 99), p(9.0, 40), p(20.0, 5)]);
        let at: Vec<(f64, Option<f64>)> = misses
            .iter()
            .map(|(p, o)| (p.gpu_seconds, o.as_ref().map(|o| o.slo_misses)))
            .collect();
        assert_eq!(at, [(7.0, None), (9.0, Some(40.0)), (20.0, Some(10.0))]);
    }

    #[test]
    fn the_budget_share_weighs_each_stretch_of_the_peers_budgets_on_a_log_scale() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // Fewer everywhere: all of it.
        let s = budget_share(&[p(10.0, 5)], &[p(10.0, 8), p(100.0, 2)]).unwrap();
        assert_eq!(
            (s.range, s.fewer, s.more, s.worst),
            ((10.0, 100.0), 1.0, 0.0, None)
        );
        // More from 10 to 50 (by 1, at 10), fewer from 50 to 100.
        let s = budget_share(&[p(10.0, 5), p(50.0, 1)], &[p(10.0, 4), p(100.0, 0)]).unwrap();
        assert!(close(s.more, 5f64.ln() / 10f64.ln()), "{s:?}");
        assert!(close(s.fewer, 2f64.ln() / 10f64.ln()), "{s:?}");
        assert_eq!(s.worst, Some((10.0, 1.0)));
        // No setting that cheap counts as more; the range runs on to our costliest.
        let s = budget_share(&[p(20.0, 1)], &[p(10.0, 5), p(15.0, 3)]).unwrap();
        assert_eq!(s.range, (10.0, 20.0));
        assert!(close(s.more, 1.0) && s.worst.is_none(), "{s:?}");
        // As many is a tie. (Both at zero never happens inside the range: each frontier
        // ends at its first zero, and the range ends at the costlier end.)
        let s = budget_share(&[p(10.0, 4), p(20.0, 0)], &[p(10.0, 4), p(40.0, 0)]).unwrap();
        assert!(close(s.tie, 0.5) && close(s.fewer, 0.5), "{s:?}");
        assert!(close(s.fewer + s.more + s.tie, 1.0));
        assert!(
            s.to_string()
                .contains("fewer at 50.0%, more at 0.0%, as many at 50.0%"),
            "{s}"
        );
        // One budget only: nothing to weigh.
        assert_eq!(budget_share(&[p(10.0, 1)], &[p(10.0, 2)]), None);
    }

    #[test]
    fn a_point_is_the_mean_of_its_phases_with_the_spread_of_their_misses() {
        let o = |g: f64, m: usize, cold: usize| Outcome {
            gpu_seconds: g,
            slo_misses: m,
            cold_starts: cold,
            duration: 3600.0,
            flaps: cold,
            ..Outcome::default()
        };
        let pt = Point::of("x", &[o(100.0, 10, 0), o(160.0, 4, 1), o(130.0, 7, 2)]);
        assert_eq!(pt.gpu_seconds, 130.0);
        assert_eq!(pt.slo_misses, 7.0);
        assert_eq!(pt.misses_range, (4, 10));
        assert_eq!(pt.spread(), "4-10");
        assert_eq!(pt.cold_starts, 1.0);
        assert_eq!(pt.flaps_per_hour, 1.0);
    }

    #[test]
    fn a_setting_beats_the_specs_only_by_costing_no_more_and_missing_fewer_or_missing_no_more_for_less(
    ) {
        let points = [p(8.0, 40), p(12.0, 10), p(20.0, 0), p(12.5, 30)];
        let at = |g: f64, m: usize| better_than(&points, &p(g, m)).map(|b| b.setting);
        // The fewest misses within the spec's budget.
        assert_eq!(at(13.0, 30), Some("12/10".to_string()));
        // On the frontier itself: nothing beats it.
        assert_eq!(at(12.0, 10), None);
        // Nothing misses fewer within 11, but 8 misses as many for less.
        assert_eq!(at(11.0, 40), Some("8/40".to_string()));
        // Cheaper than every setting.
        assert_eq!(at(7.0, 99), None);
    }

    /// A small replica with a 20 s cold start, one to begin with.
    fn small_replica() -> Setup {
        Setup {
            model: ReplicaModel {
                max_batch: 4,
                queue_capacity: 16,
                prefill_tokens_per_second: 4000.0,
                decode_tokens_per_second: 20.0,
                load_seconds: 20.0,
                gpus: 1,
            },
            slo: Slo { ttft_seconds: 1.0 },
            initial_replicas: 1,
            sample_every: 5.0,
            tick_phase: 0.0,
        }
    }

    #[test]
    fn held_out_runs_are_replays_at_phases_the_sweep_never_uses_whatever_the_rule() {
        assert!(HELD_OUT_PHASES.iter().all(|h| !PHASES.contains(h)));
        let trace = Bursty {
            duration: 300.0,
            ..Bursty::default()
        }
        .trace();
        let setup = small_replica();
        let keda = || KedaRule::new(1, 6, 2.0).with_window(30.0);
        // Boxed, as the frontier bench keeps each setting's rule to replay it again.
        let held = runs_at(
            std::slice::from_ref(&trace),
            &setup,
            &HELD_OUT_PHASES,
            || Box::new(keda()) as Box<dyn ScalingRule>,
        );
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].len(), HELD_OUT_PHASES.len());
        for (o, &tick_phase) in held[0].iter().zip(&HELD_OUT_PHASES) {
            let at = Setup {
                tick_phase,
                ..setup.clone()
            };
            let mut alone = replay(&trace, &at, &mut keda());
            alone.timeline = Vec::new();
            assert_eq!(*o, alone, "phase {tick_phase}");
        }
        // The phase moves a 15 s sync against the bursts: the runs are not all one.
        let sweep = runs(std::slice::from_ref(&trace), &setup, keda).concat();
        assert!(
            held[0]
                .iter()
                .chain(&sweep)
                .any(|o| o.gpu_seconds != sweep[0].gpu_seconds),
            "every phase gave the same run"
        );
    }

    #[test]
    fn the_planners_sweep_covers_the_grid_and_replays_each_setting_at_every_phase() {
        let trace = Bursty {
            duration: 60.0,
            ..Bursty::default()
        }
        .trace();
        assert!(trace.requests.len() > 60, "{}", trace.requests.len());
        let setup = small_replica();
        // Off the grid (target 5, 45 s), so the spec's point is its own replay.
        let spec = Params {
            min: 1,
            max: 6,
            warm: 0,
            target: 5.0,
            up_window: Duration::ZERO,
            down_window: Duration::from_secs(45),
            panic_window: Duration::from_secs(6),
            to_zero_after: None,
            predictive: false,
            learn_window: true,
        };
        let sweep = super::sweep(&trace, &setup, &spec, 3);
        let grid = WINDOWS.len() * UP_WINDOWS.len();
        assert_eq!(
            sweep.gpuscale.len(),
            QUEUES.len() * WARM.len() * LEARNED_WINDOW.len() * grid
        );
        assert_eq!(sweep.keda.len(), QUEUES.len() * grid);
        assert_eq!(sweep.hpa.len(), UTILISATIONS.len() * grid);

        // Each point is the mean of its setting's replays at every phase, under the
        // label a user copies into the spec.
        let direct = |p: &Params| {
            let runs = runs(std::slice::from_ref(&trace), &setup, || {
                GpuscaleRule::new(p.clone(), GPUSCALE_INTERVAL)
            });
            assert_eq!(runs[0].len(), PHASES.len());
            runs.concat()
        };
        let spec_runs = direct(&spec);
        assert_eq!(
            sweep.spec,
            Point::of(
                "targetQueueDepth 5, warmReplicas 0, scaleDownWindowSeconds 45, scaleUpWindowSeconds 0",
                &spec_runs
            )
        );
        let on_grid = Params {
            target: 8.0,
            warm: 1,
            down_window: Duration::from_secs(120),
            up_window: Duration::from_secs(15),
            ..spec.clone()
        };
        let label = "targetQueueDepth 8, warmReplicas 1, scaleDownWindowSeconds 120, scaleUpWindowSeconds 15";
        let found = sweep.gpuscale.iter().find(|p| p.setting == label);
        assert_eq!(found, Some(&Point::of(label, &direct(&on_grid))));
        // The same with the spec's window only, named as the spec field says.
        let fixed = Params {
            learn_window: false,
            ..on_grid
        };
        let label = format!("{label}, scaleDownWindowMode Fixed");
        let found = sweep.gpuscale.iter().find(|p| p.setting == label);
        assert_eq!(found, Some(&Point::of(label, &direct(&fixed))));
        // The peers within the spec's bounds: none goes past maxReplicas.
        let keda = runs(std::slice::from_ref(&trace), &setup, || {
            KedaRule::new(1, 6, 2.0)
                .with_window(30.0)
                .with_up_window(0.0)
        })
        .concat();
        assert!(keda.iter().all(|o| o.peak_replicas <= 6));
        let label = "queue 2, 30 s, up 0 s";
        let found = sweep.keda.iter().find(|p| p.setting == label);
        assert_eq!(found, Some(&Point::of(label, &keda)));

        let report = sweep.report(10);
        for line in [
            "gpuscale frontier (3060 settings, each the mean of 5 sync phases):",
            "HPA-style frontier (180 settings",
            "KEDA-style frontier (510 settings",
            "The spec's setting (targetQueueDepth 5, warmReplicas 0, scaleDownWindowSeconds 45, scaleUpWindowSeconds 0)",
        ] {
            assert!(report.contains(line), "{line:?} missing from:\n{report}");
        }
        match better_than(&sweep.gpuscale, &sweep.spec) {
            Some(b) => {
                assert!(report.contains(&format!("{} does better on this trace", b.setting)))
            }
            None => assert!(report.contains("no setting of the grid costs no more")),
        }
    }

    #[test]
    fn the_report_says_where_gpuscale_dominates_and_the_cheapest_setting_that_meets_the_objective()
    {
        let sweep = Sweep {
            gpuscale: vec![p(8.0, 40), p(12.0, 10), p(20.0, 0)],
            hpa: vec![p(9.0, 50)],
            // 7 is below every gpuscale setting; at 30 both miss none.
            keda: vec![p(7.0, 60), p(30.0, 0)],
            spec: p(13.0, 30),
        };
        let report = sweep.report(10);
        for line in [
            "gpuscale dominates HPA-style on this trace",
            "gpuscale does not dominate KEDA-style on this trace at 1 of its 2 frontier points (0 of them within the objective's 10 misses):",
            "  7/60 at 7 GPU-s misses 60.0; gpuscale has no setting that cheap",
            // From 7 to 8 GPU-s gpuscale has no setting: ln(8/7) / ln(30/7) of the range.
            "Against KEDA-style: of the budgets from 7 to 30 GPU-s (on a log scale), gpuscale misses fewer at 90.8%, more at 9.2%, as many at 0.0%.",
            "The spec's setting (13/30): 13 GPU-s, 30.0 over the SLO; 12/10 does better on this trace",
            "The cheapest setting of the grid that meets the objective (at most 10 over the SLO): 12/10: 12 GPU-s, 10.0 over the SLO.",
        ] {
            assert!(report.contains(line), "{line:?} missing from:\n{report}");
        }
        assert!(sweep
            .report(5)
            .contains("objective (at most 5 over the SLO): 20/0"));
        let none = Sweep {
            gpuscale: vec![p(8.0, 40)],
            ..sweep
        };
        assert!(none
            .report(10)
            .contains("No setting of the grid meets the objective (at most 10 over the SLO)"));
    }
}
