//! A PNG of every ratio in the report (gnuplot, from Debian's gnuplot-nox): people
//! would rather look than read.

use std::path::{Path, PathBuf};
use std::process::Command;

/// (label, ratio) of every table row with a ratio cell like `0.25x`.
fn parse_ratios(report: &str) -> Vec<(String, f64)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in report.lines() {
        if let Some(s) = line.strip_prefix("### ") {
            section = s.to_string();
        }
        if !line.starts_with("| ")
            || line.starts_with("| metric")
            || line.starts_with("| guest RAM (")
        {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if let Some(r) = cells
            .iter()
            .find_map(|c| c.strip_suffix('x').and_then(|n| n.parse::<f64>().ok()))
        {
            out.push((format!("{section}: {}", cells[0]), r));
        }
    }
    out
}

/// Plots the ratios of `report` into `png`.
pub fn ratios(report: &str, png: &Path) -> Result<PathBuf, String> {
    let data = parse_ratios(report);
    if data.is_empty() {
        return Err("no ratios in the report".into());
    }
    let dat = png.with_extension("dat");
    let text: String = data
        .iter()
        .enumerate()
        .map(|(i, (l, r))| format!("{i} {r} \"{}\"\n", l.replace('"', "'")))
        .collect();
    std::fs::write(&dat, text).map_err(|e| e.to_string())?;
    let script = format!(
        "set terminal pngcairo size 1200,{h} font ',10'; set output '{png}'; \
         set title 'hpcvm / peer (lower is better for time and memory; prefault is throughput: higher is better)'; \
         set style fill solid 0.6; set boxwidth 0.6; set xrange [0:*]; set yrange [-1:{n}]; \
         set ytics nomirror; set grid xtics; set arrow from 1,-1 to 1,{n} nohead dt 2; \
         plot '{dat}' using 2:1:(0):2:($1-0.3):($1+0.3):yticlabels(3) with boxxyerror notitle",
        h = 120 + 28 * data.len(),
        n = data.len(),
        png = png.display(),
        dat = dat.display()
    );
    let out = Command::new("gnuplot")
        .args(["-e", &script])
        .output()
        .map_err(|e| format!("gnuplot: {e} (apt-get install gnuplot-nox)"))?;
    let _ = std::fs::remove_file(&dat);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into());
    }
    Ok(png.to_path_buf())
}
