//! The demo's plot (plotters, SVG): load, queue depth and ready replicas of each
//! version over time on one axis of counts, with every scale and rollout event marked
//! where it happened.

use std::path::Path;

use plotters::prelude::*;

/// One row of the demo's live table.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Seconds since the traffic started.
    pub t: f64,
    pub sent_per_s: f64,
    pub queue: u32,
    pub desired: u32,
    /// Ready replicas of the stable version.
    pub stable: u32,
    /// Ready replicas of a rollout's new version.
    pub canary: u32,
}

/// An event to mark: when, and its reason (`ScaledUp`, `RolledBack`, ...).
#[derive(Clone, Debug)]
pub struct Mark {
    pub t: f64,
    pub reason: String,
}

fn mark_colour(reason: &str) -> RGBColor {
    match reason {
        "ScaledUp" | "ScaledDown" => RGBColor(120, 120, 120),
        "RolledBack" => RGBColor(200, 0, 0),
        _ => RGBColor(140, 60, 170),
    }
}

/// Draws `samples` and `marks` into an SVG at `path`: load and queue depth on the left
/// axis, replicas on the right (so a handful of replicas is not flattened under a queue
/// of a hundred).
pub fn draw(path: &Path, samples: &[Sample], marks: &[Mark]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let t_max = samples.last().map_or(1.0, |s| s.t).max(1.0);
    let load_max = samples
        .iter()
        .map(|s| s.sent_per_s.max(f64::from(s.queue)))
        .fold(1.0, f64::max)
        * 1.25;
    let replicas_max = samples
        .iter()
        .map(|s| s.desired.max(s.stable + s.canary))
        .max()
        .unwrap_or(1)
        + 2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "gpuscale demo: SmolLM2 from zero, a burst, a broken canary rolled back",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .right_y_label_area_size(55)
        .build_cartesian_2d(0.0..t_max, 0.0..load_max)?
        .set_secondary_coord(0.0..t_max, 0..replicas_max);
    chart
        .configure_mesh()
        .x_desc("seconds since the first request")
        .y_desc("requests/s sent, requests queued")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("replicas")
        .y_labels(replicas_max as usize + 1)
        .draw()?;
    type Load = (&'static str, RGBColor, fn(&Sample) -> f64);
    let load: [Load; 2] = [
        ("load (requests/s sent)", RGBColor(31, 119, 180), |s| {
            s.sent_per_s
        }),
        ("queue depth", RGBColor(255, 127, 14), |s| {
            f64::from(s.queue)
        }),
    ];
    for (name, colour, f) in load {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.t, f(s))),
                colour.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
            });
    }
    type Count = (&'static str, RGBColor, u32, fn(&Sample) -> u32);
    let counts: [Count; 3] = [
        (
            "desired replicas (right axis)",
            RGBColor(214, 39, 40),
            1,
            |s| s.desired,
        ),
        (
            "ready, stable version (right)",
            RGBColor(44, 160, 44),
            3,
            |s| s.stable,
        ),
        ("ready, canary (right)", RGBColor(148, 103, 189), 3, |s| {
            s.canary
        }),
    ];
    for (name, colour, width, f) in counts {
        chart
            .draw_secondary_series(LineSeries::new(
                samples.iter().map(|s| (s.t, f(s))),
                colour.stroke_width(width),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(width))
            });
    }
    // Each event: a thin line at its time, its reason near the top, staggered so that
    // neighbours stay readable, and kept inside the plot near the right edge.
    for (i, m) in marks.iter().enumerate() {
        let c = mark_colour(&m.reason);
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(m.t, 0.0), (m.t, load_max)],
            c.stroke_width(1),
        )))?;
        let y = load_max * (0.97 - 0.05 * (i % 4) as f64);
        let x = m.t.min(t_max * 0.93);
        chart.draw_series(std::iter::once(Text::new(
            format!(" {}", m.reason),
            (x, y),
            ("sans-serif", 11).into_font().color(&c),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_has_every_series_and_event() {
        let dir = std::env::temp_dir().join(format!("gpuscale-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("demo.svg");
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                t: f64::from(i) * 2.0,
                sent_per_s: 3.0,
                queue: i,
                desired: 2,
                stable: 2,
                canary: u32::from(i > 5),
            })
            .collect();
        let marks = [
            Mark {
                t: 4.0,
                reason: "ScaledUp".into(),
            },
            Mark {
                t: 14.0,
                reason: "RolledBack".into(),
            },
        ];
        draw(&path, &samples, &marks).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "ready, canary (right)",
            "replicas",
            "queue depth",
            "RolledBack",
            "ScaledUp",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.matches("<polyline").count() >= 5, "{svg}");
        std::fs::remove_dir_all(dir).ok();
    }
}
