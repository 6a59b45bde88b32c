//! Figures: token latency against link latency, device count and bandwidth,
//! one line per allreduce algorithm, and a wide grey band under the line `--allreduce auto`
//! follows (its choice per payload). PNG and SVG, text in an embedded DejaVu font.

use std::{path::Path, sync::Once, time::Duration};

use anyhow::{anyhow, Result};
use plotters::{
    prelude::*,
    style::{FontStyle, RGBColor},
};

use crate::{
    link::LinkSpec,
    predict::{predict, Algo, Cluster, Policy},
    topology::Topology,
};

/// One line of a figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, x in the figure's units (not log-transformed).
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// File stem, e.g. `latency`.
    pub stem: String,
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Whether the x axis is logarithmic.
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

fn logspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| lo * (hi / lo).powf(i as f64 / (n - 1) as f64))
        .collect()
}

fn token_ms(c: &Cluster, p: Policy) -> f64 {
    predict(c, p).token.as_secs_f64() * 1e3
}

/// Legend of the `auto` series (drawn as a band under the others).
const AUTO_LABEL: &str = "auto (its choice)";

/// One series per algorithm in [`Algo::ALL`] order, then `auto`.
fn sweep(base: &Cluster, xs: &[f64], vary: impl Fn(&mut Cluster, f64)) -> Vec<Series> {
    let policies = Algo::ALL.map(Policy::Fixed);
    policies
        .iter()
        .chain(&[Policy::Auto])
        .map(|&a| Series {
            label: match a {
                Policy::Auto => AUTO_LABEL.to_string(),
                Policy::Fixed(a) => a.to_string(),
            },
            points: xs
                .iter()
                .map(|&x| {
                    let mut c = base.clone();
                    vary(&mut c, x);
                    (x, token_ms(&c, a))
                })
                .collect(),
        })
        .collect()
}

/// The three standard sweeps around `base`, whose links are uniform `link`:
/// one-way link latency 0.1–10 ms, devices 2–8, bandwidth 10 Mbit/s–10 Gbit/s.
pub fn standard_figures(base: &Cluster, link: LinkSpec, what: &str) -> Vec<Figure> {
    let n = base.devices.len();
    let mut base = base.clone();
    base.topology = Topology::uniform(link);
    let y = "token latency (ms)".to_string();
    let lat = sweep(&base, &logspace(0.1, 10.0, 25), |c, ms| {
        c.topology = Topology::uniform(LinkSpec {
            latency: Duration::from_secs_f64(ms / 1e3),
            ..link
        });
    });
    let bw = sweep(&base, &logspace(10.0, 10_000.0, 25), |c, mbit| {
        c.topology = Topology::uniform(LinkSpec {
            bandwidth_bps: Some((mbit * 1e6) as u64),
            ..link
        });
    });
    let dev = base.devices[0];
    let devs: Vec<f64> = (2..=8).map(f64::from).collect();
    let nd = sweep(&base, &devs, |c, k| c.devices = vec![dev; k as usize]);
    vec![
        Figure {
            stem: "latency".into(),
            title: format!(
                "{what}, {n} devices, {}: token latency vs link latency",
                crate::link::fmt_bandwidth(link.bandwidth_bps)
            ),
            x_label: "one-way link latency per hop (ms, log scale)".into(),
            y_label: y.clone(),
            log_x: true,
            series: lat,
        },
        Figure {
            stem: "devices".into(),
            title: format!("{what}, link {link}: token latency vs devices"),
            x_label: "devices (N)".into(),
            y_label: y.clone(),
            log_x: false,
            series: nd,
        },
        Figure {
            stem: "bandwidth".into(),
            title: format!(
                "{what}, {n} devices, {} latency: token latency vs bandwidth",
                crate::link::fmt_duration(link.latency)
            ),
            x_label: "link bandwidth (Mbit/s, log scale)".into(),
            y_label: y,
            log_x: true,
            series: bw,
        },
    ]
}

const FONT: &str = "sans-serif";

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// One colour per algorithm, in [`Algo::ALL`] order.
const COLORS: [RGBColor; 5] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn fmt_tick(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1000.0 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.2}"))
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    fig: &Figure,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {}: {e:?}", fig.stem);
    root.fill(&WHITE).map_err(e)?;
    let tx = |x: f64| if fig.log_x { x.log10() } else { x };
    let pts = fig.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(tx(x));
        x1 = x1.max(tx(x));
        y1 = y1.max(y);
    }
    let mut chart = ChartBuilder::on(&root)
        .caption(&fig.title, (FONT, 20))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1 * 1.08)
        .map_err(e)?;
    let log_x = fig.log_x;
    let x_fmt = move |v: &f64| fmt_tick(if log_x { 10f64.powf(*v) } else { *v });
    chart
        .configure_mesh()
        .x_desc(&fig.x_label)
        .y_desc(&fig.y_label)
        .x_labels(7)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|v| fmt_tick(*v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(e)?;
    // The auto band first, so the algorithms' lines run over it; (series, line, legend).
    let (auto, algos): (Vec<&Series>, Vec<&Series>) =
        fig.series.iter().partition(|s| s.label == AUTO_LABEL);
    let band = RGBColor(90, 90, 90).mix(0.35);
    let styled = auto
        .into_iter()
        .map(|s| (s, band.stroke_width(9), band.stroke_width(9)))
        .chain(
            algos
                .into_iter()
                .zip(COLORS.iter().cycle())
                .map(|(s, c)| (s, c.stroke_width(2), c.stroke_width(3))),
        );
    for (s, line, legend) in styled {
        chart
            .draw_series(LineSeries::new(
                s.points.iter().map(|&(x, y)| (tx(x), y)),
                line,
            ))
            .map_err(e)?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], legend));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 17))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Render `fig` to `path`; `.svg` gives SVG, anything else PNG.
pub fn render(fig: &Figure, path: &Path) -> Result<()> {
    register_fonts();
    let size = (900, 540);
    if path.extension().is_some_and(|e| e == "svg") {
        draw(SVGBackend::new(path, size).into_drawing_area(), fig)
    } else {
        draw(BitMapBackend::new(path, size).into_drawing_area(), fig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Calibration, Device, ModelShape, Workload};

    #[test]
    fn renders_png_and_svg() {
        let c = Cluster {
            shape: ModelShape::preset("smollm2-135m").unwrap(),
            devices: vec![Device::default(); 4],
            topology: Topology::uniform("1ms,300mbit".parse().unwrap()),
            calibration: Calibration::default(),
            workload: Workload::default(),
        };
        let figs = standard_figures(&c, "1ms,300mbit".parse().unwrap(), "smollm2-135m");
        assert_eq!(figs.len(), 3);
        assert!(figs.iter().all(|f| f.series.len() == Algo::ALL.len() + 1));
        // The auto line is never above the best of its candidates (the algorithms that
        // give the star's bits) at any point.
        let candidates = [Algo::Star, Algo::Mesh, Algo::Rsag].map(|a| a.to_string());
        for f in &figs {
            let auto = f.series.iter().find(|s| s.label == AUTO_LABEL).unwrap();
            for (i, &(_, y)) in auto.points.iter().enumerate() {
                let best = f
                    .series
                    .iter()
                    .filter(|s| candidates.contains(&s.label))
                    .map(|s| s.points[i].1)
                    .fold(f64::INFINITY, f64::min);
                assert!(
                    y <= best * (1.0 + 1e-9),
                    "{}: auto {y} > best {best}",
                    f.stem
                );
            }
        }
        let dir = std::env::temp_dir().join(format!("tpi-sim-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for ext in ["png", "svg"] {
            let p = dir.join(format!("latency.{ext}"));
            render(&figs[0], &p).unwrap();
            assert!(std::fs::metadata(&p).unwrap().len() > 1000);
        }
        let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(svg.contains("token latency"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
