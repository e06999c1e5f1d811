//! Frontiers of SLO misses against GPU-seconds: each rule replayed over a sweep of its
//! settings gives points; the Pareto frontier keeps those no cheaper setting beats.
//! One rule dominates another when, at every GPU-seconds budget the other's frontier
//! reaches, it has a setting that costs no more and misses fewer requests: a better
//! policy, not a different setting of the same trade.

use super::Outcome;

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

/// Where `ours` fails to dominate `peer`: each frontier point of `peer` at whose budget
/// `ours` has no setting that costs no more and misses fewer (or none, where the peer
/// misses none too: nothing is fewer than zero), with our best setting
/// within that budget (`None`: we have no setting that cheap). Empty: `ours` dominates.
pub fn undominated(ours: &[Point], peer: &[Point]) -> Vec<(Point, Option<Point>)> {
    let ours = frontier(ours);
    frontier(peer)
        .into_iter()
        .filter_map(|p| {
            let best = ours
                .iter()
                .filter(|o| o.gpu_seconds <= p.gpu_seconds)
                .min_by(|a, b| a.slo_misses.total_cmp(&b.slo_misses))
                .cloned();
            // Fewer, or none at all where the peer misses none either.
            match &best {
                Some(b) if b.slo_misses < p.slo_misses || b.slo_misses == 0.0 => None,
                _ => Some((p, best)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(pt.cold_starts, 1.0);
        assert_eq!(pt.flaps_per_hour, 1.0);
    }
}
