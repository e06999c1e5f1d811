//! Frontiers of SLO misses against GPU-seconds (#22): each rule replayed over a sweep of
//! its main knob and its scale-down and scale-up windows, on the Azure code trace and on
//! three draws of a synthetic bursty process (`replay::synthetic`, MMPP-2, seeds
//! [`SEEDS`]). Prints each rule's Pareto
//! frontier, says at which budgets gpuscale's frontier does not dominate a peer's, and
//! draws the frontiers into `target/gpuscale-bench/autoscale-frontier.svg` (the README
//! shows a copy, `docs/autoscale-frontier.svg`).
//!
//! The peers, and how each is modelled (`operator/src/replay/rules.rs`):
//! - HPA-style: the HorizontalPodAutoscaler on the GPU-busy fraction (DCGM), 15 s sync,
//!   10% tolerance, scale-up limit max(double, +4) per sync, scale-up and scale-down
//!   stabilisation.
//! - KEDA-style: KEDA's Prometheus scaler on queue depth as it runs with one or more
//!   replicas, i.e. the HPA KEDA creates reading the metric every 15 s (AverageValue =
//!   the threshold), with the same tolerance, limit and stabilisation.
//! - gpuscale: its own policy at a 2 s scrape.
//!
//! Each setting is replayed at five phases of the rules' syncs (`Setup::tick_phase`:
//! the first decision at 0, 0.2, 0.4, 0.6 or 0.8 of the interval, so 0, 3, 6, 9 or 12 s
//! into the peers' 15 s sync), on every draw, and its point is their mean. The replays
//! are pure, so a run repeats exactly; the phase and the draw are the noise: where one or
//! two replicas decide the outcome (the cheap end), a burst one sync sees and the next
//! misses moves a setting's misses by hundreds, and on one draw a few bursts (whether a
//! replica was up before each) decide much of a cheap setting's misses. The report gives
//! each frontier point's range over its runs, the dominance count at each phase alone
//! and on each draw alone, and for each peer point gpuscale does not beat, the two
//! settings compared run by run (`paired`). gpuscale's frontier is every setting a
//! user can choose: those with `scaling.predictive` on are marked `, predictive` there,
//! those with `scaleDownWindowMode: Fixed` `, fixed window`. Last, each trace's misses
//! with all [`MAX`] replicas up from start to end: the floor of misses, where rules can
//! only tie, as they tie at one replica throughout, the floor of cost.
//!
//! A frontier point is the least of many noisy means, so it is low by the choice (the
//! winner's curse), and the more so for a rule whose results the phase moves more (the
//! peers' 15 s syncs against gpuscale's 2 s scrape). So each rule's frontier settings,
//! as chosen, are then replayed on runs none was chosen on (`held_out`): the Azure
//! trace at phases between the sweep's ([`HELD_OUT_PHASES`]), the bursty process on six
//! draws the sweep did not see ([`HELD_OUT_SEEDS`]) at those phases; and each peer
//! point gpuscale does not beat there is compared run by run, a loss counted as one
//! only beyond two standard errors.
//!
//! `cargo bench -p gpuscale-operator --bench frontier [-- path/to/trace.csv]`

use std::rc::Rc;
use std::time::{Duration, Instant};

use gpuscale_operator::autoscale::Params;
use gpuscale_operator::replay::frontier::{
    budget_share, frontier, runs, runs_at, table, undominated, Point, GPUSCALE_INTERVAL,
    HELD_OUT_PHASES, PHASES, QUEUES, UP_WINDOWS, UTILISATIONS, WARM, WINDOWS,
};
use gpuscale_operator::replay::synthetic::Bursty;
use gpuscale_operator::replay::{
    GpuscaleRule, HpaRule, KedaRule, Outcome, ScalingRule, Setup, Trace,
};

mod common;
use plotters::prelude::*;

const MIN: u32 = 1;
/// Room enough that no rule is held by the bound (each rule's peak is printed).
const MAX: u32 = 24;
/// Draws of the synthetic bursty process (`Bursty::seed`): each setting's point is its
/// mean over them, so that no single burst of one draw decides a frontier.
const SEEDS: [u64; 3] = [2023, 2024, 2025];
/// Draws the sweep does not see: each rule's frontier settings, chosen on [`SEEDS`] at
/// [`PHASES`], are replayed on these at [`HELD_OUT_PHASES`] (`held_out`).
const HELD_OUT_SEEDS: [u64; 6] = [2026, 2027, 2028, 2029, 2030, 2031];

/// How to make one setting's rule afresh, whatever the rule.
type Make = Rc<dyn Fn() -> Box<dyn ScalingRule>>;

struct Rule {
    name: &'static str,
    /// Each setting's mean over the draws and phases.
    points: Vec<Point>,
    /// Each setting at each phase alone (the mean over the draws).
    by_phase: Vec<Vec<Point>>,
    /// Each setting on each draw of the trace alone (the mean over the phases).
    by_draw: Vec<Vec<Point>>,
    /// Each setting's misses in each run (draw by draw, phase by phase), in the order
    /// of `points`: for the paired comparison of two settings on the same runs.
    runs: Vec<Vec<usize>>,
    /// How to make each setting's rule, in the order of `points`: to replay the
    /// frontier's settings on held-out runs.
    makes: Vec<Make>,
    peak: u32,
}

impl Rule {
    fn new(name: &'static str, draws: usize, phases: usize) -> Rule {
        Rule {
            name,
            points: Vec::new(),
            by_phase: vec![Vec::new(); phases],
            by_draw: vec![Vec::new(); draws],
            runs: Vec::new(),
            makes: Vec::new(),
            peak: 0,
        }
    }

    /// Replays one setting on every draw at every phase, each with a fresh rule from
    /// `rule`.
    fn record<R: ScalingRule + 'static>(
        &mut self,
        setting: String,
        (traces, setup): (&[Trace], &Setup),
        rule: impl Fn() -> R + 'static,
    ) {
        let replays = runs(traces, setup, &rule);
        let make: Make = Rc::new(move || Box::new(rule()));
        self.push(setting, replays, make);
    }

    /// Takes one setting's replays, `[draw][phase]`.
    fn push(&mut self, setting: String, replays: Vec<Vec<Outcome>>, make: Make) {
        self.makes.push(make);
        for (d, draw) in replays.iter().enumerate() {
            self.by_draw[d].push(Point::of(setting.clone(), draw));
        }
        for (i, phase) in self.by_phase.iter_mut().enumerate() {
            let at: Vec<Outcome> = replays.iter().map(|draw| draw[i].clone()).collect();
            phase.push(Point::of(setting.clone(), &at));
        }
        let all: Vec<Outcome> = replays.into_iter().flatten().collect();
        self.runs.push(all.iter().map(|o| o.slo_misses).collect());
        self.peak = all
            .iter()
            .map(|o| o.peak_replicas)
            .fold(self.peak, u32::max);
        self.points.push(Point::of(setting, &all));
    }

    /// This rule's settings and `other`'s as one rule's (gpuscale with
    /// `scaling.predictive` off and on: both are settings a user can choose), `other`'s
    /// named with `mark` after them so the report says which is which.
    fn with(&self, other: &Rule, mark: &str) -> Rule {
        let join = |a: &[Point], b: &[Point]| {
            let marked = b.iter().map(|p| Point {
                setting: format!("{}{mark}", p.setting),
                ..p.clone()
            });
            a.iter().cloned().chain(marked).collect::<Vec<_>>()
        };
        let zip =
            |a: &[Vec<Point>], b: &[Vec<Point>]| a.iter().zip(b).map(|(a, b)| join(a, b)).collect();
        Rule {
            name: self.name,
            points: join(&self.points, &other.points),
            by_phase: zip(&self.by_phase, &other.by_phase),
            by_draw: zip(&self.by_draw, &other.by_draw),
            runs: self.runs.iter().chain(&other.runs).cloned().collect(),
            makes: self.makes.iter().chain(&other.makes).cloned().collect(),
            peak: self.peak.max(other.peak),
        }
    }

    /// This rule's frontier settings, as chosen on the sweep's runs, and every setting
    /// that ties one of them there (the same cost and misses: which of a tie the
    /// frontier lists is arbitrary, as at the one-replica floor, where hundreds tie),
    /// replayed on `traces` at `phases`, runs they were not chosen on: their points
    /// there, which need not all stay on the frontier.
    fn held_out(&self, traces: &[Trace], setup: &Setup, phases: &[f64]) -> Rule {
        let front = frontier(&self.points);
        let mut out = Rule::new(self.name, traces.len(), phases.len());
        for (p, make) in self.points.iter().zip(&self.makes) {
            let ties = |f: &Point| f.gpu_seconds == p.gpu_seconds && f.slo_misses == p.slo_misses;
            if front.iter().any(ties) {
                let replays = runs_at(traces, setup, phases, || make());
                out.push(p.setting.clone(), replays, make.clone());
            }
        }
        out
    }

    fn index(&self, setting: &str) -> usize {
        self.points
            .iter()
            .position(|p| p.setting == setting)
            .expect("a frontier point is one of the rule's settings")
    }

    /// The misses in each run of the setting named `setting`.
    fn runs_of(&self, setting: &str) -> &[usize] {
        &self.runs[self.index(setting)]
    }
}

/// Two settings compared run by run (the same draw at the same phase): in how many
/// runs `ours` misses fewer and more than `peer`, and the mean of `peer - ours` with
/// its standard error. Both settings see the same bursts at the same sync phase in a
/// run, so the paired difference is free of the noise the two share, which the ranges
/// of the two means are not.
struct Paired {
    runs: usize,
    fewer: usize,
    more: usize,
    /// The peer's misses minus ours, the mean over the runs.
    mean: f64,
    /// Its standard error.
    se: f64,
}

impl Paired {
    fn of(ours: &[usize], peer: &[usize]) -> Paired {
        let d: Vec<f64> = peer
            .iter()
            .zip(ours)
            .map(|(&p, &o)| p as f64 - o as f64)
            .collect();
        let n = d.len() as f64;
        let mean = d.iter().sum::<f64>() / n;
        let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        Paired {
            runs: d.len(),
            fewer: d.iter().filter(|&&x| x > 0.0).count(),
            more: d.iter().filter(|&&x| x < 0.0).count(),
            mean,
            se: (var / n).sqrt(),
        }
    }

    /// Whether the peer misses fewer by more than two standard errors: a loss the
    /// noise does not explain.
    fn peer_clearly_fewer(&self) -> bool {
        self.mean < -2.0 * self.se
    }
}

impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run by run ({}): gpuscale fewer in {}, more in {}; the peer's misses minus gpuscale's {:+.1} (standard error {:.1})",
            self.runs, self.fewer, self.more, self.mean, self.se
        )
    }
}

fn sweep(traces: &[Trace], setup: &Setup) -> Vec<Rule> {
    let on = (traces, setup);
    let (n, phases) = (traces.len(), PHASES.len());
    let mut ours = Rule::new("gpuscale", n, phases);
    let mut hpa = Rule::new("HPA-style", n, phases);
    let mut keda = Rule::new("KEDA-style", n, phases);
    let mut predictive = Rule::new("gpuscale predictive", n, phases);
    let mut unlearned = Rule::new("gpuscale, scaleDownWindowMode Fixed", n, phases);
    for window in WINDOWS {
        for target in QUEUES {
            for (warm, forecast, learn, up) in WARM
                .into_iter()
                .flat_map(|w| [(w, false, true), (w, true, true), (w, false, false)])
                .flat_map(|(w, f, l)| UP_WINDOWS.map(|u| (w, f, l, u)))
            {
                let p = Params {
                    min: MIN,
                    max: MAX,
                    warm,
                    target: f64::from(target),
                    up_window: Duration::from_secs_f64(up),
                    down_window: Duration::from_secs_f64(window),
                    panic_window: Duration::from_secs(6),
                    to_zero_after: None,
                    predictive: forecast,
                    learn_window: learn,
                };
                let rule = match (forecast, learn) {
                    (true, _) => &mut predictive,
                    (false, true) => &mut ours,
                    (false, false) => &mut unlearned,
                };
                rule.record(
                    format!("queue {target}, {warm} warm, {window} s, up {up} s"),
                    on,
                    move || GpuscaleRule::new(p.clone(), GPUSCALE_INTERVAL),
                );
            }
            for up in UP_WINDOWS {
                keda.record(
                    format!("queue {target}, {window} s, up {up} s"),
                    on,
                    move || {
                        KedaRule::new(MIN, MAX, f64::from(target))
                            .with_window(window)
                            .with_up_window(up)
                    },
                );
            }
        }
        for util in UTILISATIONS {
            for up in UP_WINDOWS {
                hpa.record(
                    format!("{:.0}% busy, {window} s, up {up} s", util * 100.0),
                    on,
                    move || {
                        HpaRule::new(MIN, MAX, util)
                            .with_window(window)
                            .with_up_window(up)
                    },
                );
            }
        }
    }
    vec![ours, hpa, keda, predictive, unlearned]
}

/// gpuscale with `scaling.predictive` off, either `scaleDownWindowMode` (the fixed
/// window's settings marked `, fixed window`).
fn reactive(rules: &[Rule]) -> Rule {
    rules[0].with(&rules[4], ", fixed window")
}

/// gpuscale as a user can set it: `scaling.predictive` off or on (marked `, predictive`)
/// and either `scaleDownWindowMode`.
fn settable(rules: &[Rule]) -> Rule {
    reactive(rules).with(&rules[3], ", predictive")
}

/// Prints the frontiers and the dominance counts; `requests`: the mean requests of a
/// draw.
fn report(title: &str, requests: f64, rules: &[Rule]) -> bool {
    println!("\n== {title}");
    let draws = rules[0].by_draw.len();
    for r in rules {
        println!(
            "{} frontier ({} settings swept, each at {} phases{}; peak {} replicas of {MAX}):",
            r.name,
            r.points.len(),
            PHASES.len(),
            if draws > 1 {
                format!(" of {draws} draws")
            } else {
                String::new()
            },
            r.peak
        );
        print!("{}", table(&r.points, "(runs)"));
    }
    let reactive = reactive(rules);
    let ours = settable(rules);
    let count = |gaps: &[(Point, Option<Point>)]| {
        let n = gaps.iter().filter(|(p, _)| useful(p, requests)).count();
        format!("{} ({n})", gaps.len())
    };
    let mut dominates = true;
    for peer in &rules[1..3] {
        let each = |of: fn(&Rule) -> &Vec<Vec<Point>>| {
            of(&ours)
                .iter()
                .zip(of(peer))
                .map(|(o, p)| count(&undominated(o, p)))
                .collect::<Vec<String>>()
                .join(", ")
        };
        let by_draw = if draws > 1 {
            format!("; on each draw alone {}", each(|r| &r.by_draw))
        } else {
            String::new()
        };
        println!(
            "against {}, frontier points gpuscale does not dominate (of them, with at most 10% of requests over the SLO): at each phase alone {}{by_draw}; over the mean with scaling.predictive off only {}",
            peer.name,
            each(|r| &r.by_phase),
            count(&undominated(&reactive.points, &peer.points)),
        );
        dominates &= compare("", &ours, peer, requests);
    }
    // scaling.predictive against the same policy without it.
    let gaps = undominated(&rules[3].points, &rules[0].points).len();
    let back = undominated(&rules[0].points, &rules[3].points).len();
    println!(
        "scaling.predictive: the reactive frontier has {gaps} points the predictive one does not beat; the predictive frontier has {back} the reactive one does not beat"
    );
    // The learned scale-down window against the spec's window alone, setting by
    // setting: flaps, cold starts, GPU-seconds and misses.
    let (learned, fixed) = (&rules[0].points, &rules[4].points);
    let sum = |ps: &[Point], f: &dyn Fn(&Point) -> f64| ps.iter().map(f).sum::<f64>();
    let max_flaps = |ps: &[Point]| ps.iter().map(|p| p.flaps_per_hour).fold(0.0, f64::max);
    println!(
        "learned scale-down window, over the same {} settings: flaps/h {:.1} in all (worst {:.1}) against {:.1} (worst {:.1}) with the spec's window only; cold starts {:.0} against {:.0}; GPU-seconds {:+.1}%; misses {:.0} against {:.0}",
        learned.len(),
        sum(learned, &|p| p.flaps_per_hour),
        max_flaps(learned),
        sum(fixed, &|p| p.flaps_per_hour),
        max_flaps(fixed),
        sum(learned, &|p| p.cold_starts),
        sum(fixed, &|p| p.cold_starts),
        (sum(learned, &|p| p.gpu_seconds) / sum(fixed, &|p| p.gpu_seconds) - 1.0) * 100.0,
        sum(learned, &|p| p.slo_misses),
        sum(fixed, &|p| p.slo_misses),
    );
    let gaps = undominated(&rules[4].points, &rules[0].points).len();
    let back = undominated(&rules[0].points, &rules[4].points).len();
    println!(
        "learned window: the spec-window frontier has {gaps} points the learned one does not beat; the learned frontier has {back} the spec-window one does not beat"
    );
    dominates
}

/// An operating point a user would choose: at least 90% of a draw's `requests` within
/// the SLO.
fn useful(p: &Point, requests: f64) -> bool {
    p.slo_misses * 10.0 <= requests
}

/// Whether `ours` dominates `peer`, as said after `label`; where not, prints the peer
/// points gpuscale does not beat (how many with at most 10% of a draw's `requests` over
/// the SLO), each against gpuscale's best setting within its budget run by run, with
/// how many of the points the peer wins beyond the noise (`Paired::peer_clearly_fewer`),
/// then the shares of the budgets.
fn compare(label: &str, ours: &Rule, peer: &Rule, requests: f64) -> bool {
    let gaps = undominated(&ours.points, &peer.points);
    if gaps.is_empty() {
        println!(
            "{label}gpuscale dominates {}: at every budget its frontier reaches, gpuscale misses fewer",
            peer.name
        );
        return true;
    }
    println!(
        "{label}gpuscale does NOT dominate {} at {} ({} with at most 10% of requests over the SLO) of its frontier points:",
        peer.name,
        gaps.len(),
        gaps.iter().filter(|(p, _)| useful(p, requests)).count()
    );
    let mut clearly = 0;
    for (p, best) in gaps {
        match best {
            Some(o) => {
                let paired = Paired::of(ours.runs_of(&o.setting), peer.runs_of(&p.setting));
                clearly += usize::from(paired.peer_clearly_fewer());
                println!(
                    "  {} at {:.0} GPU-s misses {:.1} ({}); gpuscale's best within that budget misses {:.1} ({}; {})\n    {paired}",
                    p.setting, p.gpu_seconds, p.slo_misses, p.spread(), o.slo_misses, o.spread(), o.setting,
                );
            }
            None => {
                clearly += 1;
                println!(
                    "  {} at {:.0} GPU-s misses {:.1} ({}); gpuscale has no setting that cheap",
                    p.setting,
                    p.gpu_seconds,
                    p.slo_misses,
                    p.spread()
                );
            }
        }
    }
    println!("  of them, the peer misses fewer beyond the noise (by more than two standard errors, run by run) at {clearly}");
    if let Some(share) = budget_share(&ours.points, &peer.points) {
        println!("against {}, {share}", peer.name);
    }
    false
}

/// The frontiers met on held-out runs: each rule's frontier settings, as the sweep
/// chose them, replayed on `held` at [`HELD_OUT_PHASES`] (`Rule::held_out`), gpuscale's
/// settings a user can choose against each peer's. A frontier of means chosen as the
/// least of many is low by the choice, the more so for the noisier rule; held out, the
/// comparison is free of that, and a gap that stays beyond the noise there is a loss.
fn report_held_out(what: &str, requests: f64, rules: &[Rule], (held, setup): (&[Trace], &Setup)) {
    let ours = settable(rules).held_out(held, setup, &HELD_OUT_PHASES);
    println!(
        "\n== held out: {what}, each rule's frontier settings replayed at phases {:?} of its interval",
        HELD_OUT_PHASES
    );
    print!(
        "{} ({} settings, the frontier's and those tied with them):\n{}",
        ours.name,
        ours.points.len(),
        table(&ours.points, "(runs)")
    );
    for peer in &rules[1..3] {
        let theirs = peer.held_out(held, setup, &HELD_OUT_PHASES);
        print!(
            "{} ({} settings, the frontier's and those tied with them):\n{}",
            theirs.name,
            theirs.points.len(),
            table(&theirs.points, "(runs)")
        );
        compare("held out, ", &ours, &theirs, requests);
    }
}

fn plot(path: &std::path::Path, panels: &[(&str, Vec<Rule>)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len()));
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
    ];
    for ((title, rules), area) in panels.iter().zip(areas) {
        let fronts: Vec<Vec<Point>> = rules.iter().map(|r| frontier(&r.points)).collect();
        let all = fronts.iter().flatten();
        let x_max = all.clone().map(|p| p.gpu_seconds).fold(0.0, f64::max) / 3600.0 * 1.05;
        let x_min = all.clone().map(|p| p.gpu_seconds).fold(f64::MAX, f64::min) / 3600.0 * 0.95;
        let y_max = all.map(|p| p.slo_misses).fold(1.0, f64::max) * 1.05 + 1.0;
        let mut chart = ChartBuilder::on(&area)
            .caption(*title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("GPU-hours")
            .y_desc("requests over the TTFT SLO")
            .x_label_formatter(&|x| format!("{x:.1}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(RGBColor(238, 238, 238))
            .draw()?;
        for ((rule, front), colour) in rules.iter().zip(&fronts).zip(colours) {
            // A frontier is a staircase: a budget buys the misses of the last point
            // within it.
            let mut steps = Vec::new();
            for (i, p) in front.iter().enumerate() {
                let x = p.gpu_seconds / 3600.0;
                if i > 0 {
                    steps.push((x, front[i - 1].slo_misses));
                }
                steps.push((x, p.slo_misses));
            }
            if let Some(last) = front.last() {
                steps.push((x_max, last.slo_misses));
            }
            chart
                .draw_series(LineSeries::new(steps, colour.stroke_width(2)))?
                .label(rule.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
            chart.draw_series(front.iter().map(|p| {
                Circle::new((p.gpu_seconds / 3600.0, p.slo_misses), 3, colour.filled())
            }))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let (_, azure) = common::trace_from_args()?;
    let bursty = draws(&SEEDS);
    let setup = common::replica_setup(MIN);
    println!(
        "replica: batch 8, 8000 prompt tok/s, 40 tok/s per sequence, 45 s cold start, {MIN}..{MAX} replicas; SLO: TTFT <= 2 s"
    );
    let mut panels = Vec::new();
    let mut all = true;
    let sizes: Vec<String> = bursty
        .iter()
        .map(|t| t.requests.len().to_string())
        .collect();
    let unseen = draws(&HELD_OUT_SEEDS);
    for (title, traces, (held, what)) in [
        (
            format!("Azure code trace ({} requests)", azure.requests.len()),
            std::slice::from_ref(&azure),
            (
                std::slice::from_ref(&azure),
                "the Azure code trace".to_string(),
            ),
        ),
        (
            format!(
                "bursty MMPP-2, seeds {} ({} requests)",
                SEEDS.map(|s| s.to_string()).join("/"),
                sizes.join("/")
            ),
            &bursty[..],
            (
                &unseen[..],
                format!(
                    "bursty MMPP-2 on draws the sweep did not see, seeds {}",
                    HELD_OUT_SEEDS.map(|s| s.to_string()).join("/")
                ),
            ),
        ),
    ] {
        let started = Instant::now();
        let rules = sweep(traces, &setup);
        let n: usize = rules.iter().map(|r| r.points.len()).sum();
        println!(
            "\nswept {n} settings in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let requests =
            traces.iter().map(|t| t.requests.len()).sum::<usize>() as f64 / traces.len() as f64;
        all &= report(&title, requests, &rules);
        let started = Instant::now();
        let held_requests =
            held.iter().map(|t| t.requests.len()).sum::<usize>() as f64 / held.len() as f64;
        report_held_out(&what, held_requests, &rules, (held, &setup));
        println!("(held out in {:.2} s)", started.elapsed().as_secs_f64());
        // The other floor: the misses of the most any rule here can spend.
        let held = Setup {
            initial_replicas: MAX,
            ..setup.clone()
        };
        let most = runs(traces, &held, || {
            GpuscaleRule::new(held_at(MAX), GPUSCALE_INTERVAL)
        })
        .concat();
        let floor = Point::of(format!("{MAX} replicas throughout"), &most);
        println!(
            "{MAX} replicas (the bound) from the start to the end: {:.1} over the SLO ({}) at {:.0} GPU-s, the misses no rule here avoids by scaling",
            floor.slo_misses,
            floor.spread(),
            floor.gpu_seconds
        );
        panels.push((title, rules));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gpuscale-bench");
    std::fs::create_dir_all(&dir)?;
    let svg = dir.join("autoscale-frontier.svg");
    // gpuscale as a user can set it, against the peers.
    let refs: Vec<(&str, Vec<Rule>)> = panels
        .into_iter()
        .map(|(t, mut r)| {
            let ours = settable(&r);
            r[0] = ours;
            r.truncate(3);
            (leak(t), r)
        })
        .collect();
    plot(&svg, &refs)?;
    println!("\nplot: {}", svg.display());
    println!(
        "gpuscale's frontier {} both peers' on both traces",
        if all {
            "dominates"
        } else {
            "does not dominate"
        }
    );
    Ok(())
}

/// The bursty process's draws of `seeds`.
fn draws(seeds: &[u64]) -> Vec<Trace> {
    seeds
        .iter()
        .map(|&seed| {
            Bursty {
                seed,
                ..Bursty::default()
            }
            .trace()
        })
        .collect()
}

/// A policy held at `n` replicas.
fn held_at(n: u32) -> Params {
    Params {
        min: n,
        max: n,
        warm: 0,
        target: 1.0,
        up_window: Duration::ZERO,
        down_window: Duration::ZERO,
        panic_window: Duration::from_secs(6),
        to_zero_after: None,
        predictive: false,
        learn_window: false,
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}
