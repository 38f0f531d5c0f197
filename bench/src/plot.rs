//! SVG line charts for the bench report, written by hand (no plotting dependency): throughput and latency against concurrency, RSS against idle sessions.

/// A line chart as SVG: `series` of (x, y) points with a name each.
fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let x_max = xs.fold(1e-9, f64::max);
    let y_max = ys.fold(1e-9, f64::max) * 1.1;
    let px = |x: f64| m + x / x_max * (w - 2.0 * m);
    let py = |y: f64| h - m - y / y_max * (h - 2.0 * m);
    let colors = ["#1f77b4", "#d62728", "#2ca02c"];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{y_label}</text>\n",
        w / 2.0,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n",
            m - 6.0,
            py(y) + 4.0,
            y
        ));
    }
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for (x, y) in points {
            svg.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>\n",
                px(*x),
                py(*y),
                px(*x),
                h - m + 16.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n",
            w - m - 150.0,
            m + 16.0 * i as f64
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Throughput and mean latency against concurrent sessions: two charts stacked in one file.
pub fn concurrency_svg(concurrency: &[(usize, f64, f64)]) -> String {
    let rate: Vec<(f64, f64)> = concurrency.iter().map(|c| (c.0 as f64, c.1)).collect();
    let lat: Vec<(f64, f64)> = concurrency.iter().map(|c| (c.0 as f64, c.2)).collect();
    let mut svg = line_chart(
        "exec.run `true`: throughput vs concurrent sessions",
        "sessions",
        "commands per second",
        &[("cmds/s", rate)],
    );
    svg.push_str(&line_chart(
        "exec.run `true`: mean latency vs concurrent sessions",
        "sessions",
        "mean latency (µs)",
        &[("latency µs", lat)],
    ));
    // Two charts stacked in one file: wrap them.
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"800\">\n<g>{}</g>\n<g transform=\"translate(0 400)\">{}</g>\n</svg>\n",
        strip_outer(&svg, 0),
        strip_outer(&svg, 1)
    )
}

fn strip_outer(svg: &str, index: usize) -> String {
    svg.split("</svg>")
        .nth(index)
        .map(|s| s.replacen("<svg", "<svg x=\"0\" y=\"0\"", 1) + "</svg>")
        .unwrap_or_default()
}

/// Daemon RSS against idle sessions.
pub fn rss_svg(rss_by_sessions: &[(usize, u64)]) -> String {
    let points: Vec<(f64, f64)> = rss_by_sessions
        .iter()
        .map(|(n, rss)| (*n as f64, *rss as f64 / 1048576.0))
        .collect();
    line_chart(
        "daemon RSS vs idle sessions",
        "idle sessions",
        "RSS (MiB)",
        &[("RSS MiB", points)],
    )
}
