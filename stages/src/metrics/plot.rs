//! `loss.png`: a line chart of loss against step, drawn by hand.
//!
//! A charting crate (plotters) with a bundled TrueType font would pull in
//! `image`, a font parser and a rasteriser for one picture per run. This
//! file instead draws onto an RGB buffer (anti-aliased lines, a built-in 5x7
//! bitmap font from `glyphs.txt`, scaled) and encodes the PNG itself with
//! `flate2` and `crc32fast`, which the workspace already builds.

use std::io::{self, Write};
use std::path::Path;
use std::sync::OnceLock;

/// The size [`plot_loss`] draws at, in pixels (width, height).
pub const PLOT_SIZE: (u32, u32) = (800, 500);

const WHITE: [u8; 3] = [255, 255, 255];
const BLACK: [u8; 3] = [0, 0, 0];
const GRID: [u8; 3] = [225, 225, 225];
const MUTED: [u8; 3] = [120, 120, 120];
/// matplotlib's first colour, so the plot looks familiar.
const LINE: [u8; 3] = [31, 119, 180];

/// Plot `points` (step, loss) as a line chart at [`PLOT_SIZE`] into `path`.
/// Points need not be sorted. NaN and infinite losses are skipped and the
/// title says how many. No points: empty axes saying "no data".
pub fn plot_loss(path: &Path, points: &[(u64, f64)], title: &str) -> io::Result<()> {
    plot_loss_sized(path, points, title, PLOT_SIZE.0, PLOT_SIZE.1)
}

/// [`plot_loss`] at `width` x `height` pixels (at least 200 x 150, at most
/// 8192 on a side). The file is written to a temporary name and renamed.
pub fn plot_loss_sized(path: &Path, points: &[(u64, f64)], title: &str, width: u32, height: u32) -> io::Result<()> {
    if !(200..=8192).contains(&width) || !(150..=8192).contains(&height) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("plot size {width}x{height}: use 200..=8192 x 150..=8192 pixels"),
        ));
    }
    let canvas = draw_chart(points, title, width, height);
    let png = encode_png(&canvas)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    fs_err::write(&tmp, png)?;
    fs_err::rename(&tmp, path)
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        let (w, h) = (w as usize, h as usize);
        Canvas { w, h, px: vec![WHITE; w * h] }
    }

    /// Fill the pixels [x0, x1) x [y0, y1), clipped.
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let (x0, x1) = (x0.clamp(0, self.w as i64) as usize, x1.clamp(0, self.w as i64) as usize);
        let (y0, y1) = (y0.clamp(0, self.h as i64) as usize, y1.clamp(0, self.h as i64) as usize);
        for y in y0..y1 {
            self.px[y * self.w + x0..y * self.w + x1].fill(c);
        }
    }

    fn blend(&mut self, x: usize, y: usize, c: [u8; 3], alpha: f32) {
        let p = &mut self.px[y * self.w + x];
        for i in 0..3 {
            p[i] = (f32::from(p[i]) * (1.0 - alpha) + f32::from(c[i]) * alpha).round() as u8;
        }
    }

    /// Draw `text` with its top-left corner at (x, y), each font cell
    /// `scale` pixels square. Non-ASCII characters draw as `?`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, c: [u8; 3]) {
        self.text_with(text, scale, |tx, ty| (x + tx, y + ty), c);
    }

    /// Draw `text` reading bottom to top, its bottom-left corner at (x, y).
    fn text_up(&mut self, x: i64, y: i64, text: &str, scale: i64, c: [u8; 3]) {
        self.text_with(text, scale, |tx, ty| (x + ty, y - tx - 1), c);
    }

    fn text_with(&mut self, text: &str, scale: i64, at: impl Fn(i64, i64) -> (i64, i64), c: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            for (gy, row) in rows.iter().enumerate() {
                for gx in 0..5i64 {
                    if row & (0x10 >> gx) == 0 {
                        continue;
                    }
                    for sy in 0..scale {
                        for sx in 0..scale {
                            let (x, y) = at(i as i64 * 6 * scale + gx * scale + sx, gy as i64 * scale + sy);
                            if (0..self.w as i64).contains(&x) && (0..self.h as i64).contains(&y) {
                                self.px[y as usize * self.w + x as usize] = c;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `text` at `scale` (no trailing gap).
fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * 6 - 1) * scale
    }
}

const GLYPH_H: i64 = 7;

/// The 7 rows (low 5 bits, MSB = leftmost) of `ch`'s glyph.
fn glyph(ch: char) -> [u8; 7] {
    static FONT: OnceLock<Vec<[u8; 7]>> = OnceLock::new();
    let font = FONT.get_or_init(|| parse_font(include_str!("glyphs.txt")));
    let code = ch as u32;
    let i = if (0x20..0x7f).contains(&code) { code - 0x20 } else { u32::from(b'?') - 0x20 };
    font[i as usize]
}

/// Parse `glyphs.txt`; the format is described at its top. The file is part
/// of the source, checked by a test, so a malformed one is a bug: panic.
fn parse_font(src: &str) -> Vec<[u8; 7]> {
    let mut font = vec![[0u8; 7]; 95];
    let mut lines = src.lines().filter(|l| !l.starts_with("//"));
    while let Some(head) = lines.next() {
        let hex = head.split_whitespace().next().and_then(|h| h.strip_prefix("0x"));
        let code = hex.and_then(|h| u32::from_str_radix(h, 16).ok()).filter(|c| (0x20..0x7f).contains(c));
        let code = code.unwrap_or_else(|| panic!("glyphs.txt: bad glyph header {head:?}"));
        let g = &mut font[(code - 0x20) as usize];
        for row in g.iter_mut() {
            let line = lines.next().unwrap_or_else(|| panic!("glyphs.txt: glyph {head:?} is short"));
            assert!(line.len() == 5 && line.bytes().all(|b| b == b'#' || b == b'.'), "glyphs.txt: {line:?}");
            *row = line.bytes().fold(0, |acc, b| (acc << 1) | u8::from(b == b'#'));
        }
    }
    font
}

/// Tick positions: multiples of 1, 2 or 5 x 10^k inside [lo, hi], about
/// `target` of them, and the spacing.
fn ticks(lo: f64, hi: f64, target: usize, min_step: f64) -> (Vec<f64>, f64) {
    let raw = ((hi - lo) / target.max(1) as f64).max(min_step);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * mag);
    let mut out = Vec::new();
    let mut k = (lo / step).ceil();
    while k * step <= hi + step * 1e-9 && out.len() < 100 {
        out.push(k * step);
        k += 1.0;
    }
    (out, step)
}

/// A tick label with as many decimals as the spacing needs; scientific
/// notation for very large or very small numbers.
fn tick_label(v: f64, step: f64) -> String {
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    if v.abs() >= 1e6 || step < 1e-4 {
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Lay out and draw the chart.
fn draw_chart(points: &[(u64, f64)], title: &str, width: u32, height: u32) -> Canvas {
    let mut c = Canvas::new(width, height);
    let (w, h) = (i64::from(width), i64::from(height));

    let mut pts: Vec<(f64, f64)> = points.iter().filter(|(_, v)| v.is_finite()).map(|&(s, v)| (s as f64, v)).collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let skipped = points.len() - pts.len();
    let title = match skipped {
        0 => title.to_owned(),
        1 => format!("{title} (1 non-finite value skipped)"),
        n => format!("{title} ({n} non-finite values skipped)"),
    };

    // Data ranges, padded so the line does not sit on the frame.
    let (x0, x1) = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (a.0, b.0),
        (Some(a), _) => ((a.0 - 1.0).max(0.0), (a.0 - 1.0).max(0.0) + 2.0),
        _ => (0.0, 1.0),
    };
    let (ymin, ymax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (y0, y1) = if pts.is_empty() {
        (0.0, 1.0)
    } else if ymax > ymin {
        let pad = (ymax - ymin) * 0.05;
        (ymin - pad, ymax + pad)
    } else {
        let pad = if ymin == 0.0 { 1.0 } else { ymin.abs() * 0.1 };
        (ymin - pad, ymax + pad)
    };

    // Layout: font scale, margins from the widest labels.
    let s: i64 = if w >= 480 && h >= 300 { 2 } else { 1 };
    let pad = 6 * s;
    let (title_s, title) = fit_title(&title, w - 2 * pad, s);
    let (xt, xstep) = ticks(x0, x1, (w / (70 * s)).max(2) as usize, 1.0);
    let (yt, ystep) = ticks(y0, y1, (h / (40 * s)).max(2) as usize, 0.0);
    let ylabels: Vec<String> = yt.iter().map(|&v| tick_label(v, ystep)).collect();
    let xlabels: Vec<String> = xt.iter().map(|&v| tick_label(v, xstep)).collect();
    let ylabel_w = ylabels.iter().map(|l| text_width(l, s)).max().unwrap_or(0);
    let last_x_w = xlabels.last().map_or(0, |l| text_width(l, s));
    let tick = 3 * s;
    let left = pad + GLYPH_H * s + pad + ylabel_w + pad + tick;
    let right = w - pad.max(last_x_w / 2 + 2);
    let top = pad + GLYPH_H * title_s + 2 * pad;
    let bottom = h - (pad + GLYPH_H * s + pad + GLYPH_H * s + pad + tick);
    let (pw, ph) = ((right - left).max(1) as f64, (bottom - top).max(1) as f64);
    let px = |x: f64| left as f64 + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| bottom as f64 - (y - y0) / (y1 - y0) * ph;

    // Title, grid, ticks and labels.
    c.text((w - text_width(&title, title_s)) / 2, pad, &title, title_s, BLACK);
    for (v, label) in xt.iter().zip(&xlabels) {
        let x = px(*v).round() as i64;
        c.rect(x, top, x + 1, bottom, GRID);
        c.rect(x, bottom, x + 1, bottom + tick, BLACK);
        c.text(x - text_width(label, s) / 2, bottom + tick + pad, label, s, BLACK);
    }
    for (v, label) in yt.iter().zip(&ylabels) {
        let y = py(*v).round() as i64;
        c.rect(left, y, right, y + 1, GRID);
        c.rect(left - tick, y, left, y + 1, BLACK);
        c.text(left - tick - pad - text_width(label, s), y - GLYPH_H * s / 2, label, s, BLACK);
    }
    c.rect(left, top, right + 1, top + 1, BLACK);
    c.rect(left, bottom, right + 1, bottom + 1, BLACK);
    c.rect(left, top, left + 1, bottom + 1, BLACK);
    c.rect(right, top, right + 1, bottom + 1, BLACK);
    let xname = "step";
    c.text((left + right - text_width(xname, s)) / 2, h - pad - GLYPH_H * s, xname, s, BLACK);
    let yname = "loss";
    c.text_up(pad, (top + bottom + text_width(yname, s)) / 2, yname, s, BLACK);

    if pts.is_empty() {
        let msg = "no data";
        c.text((left + right - text_width(msg, s)) / 2, (top + bottom - GLYPH_H * s) / 2, msg, s, MUTED);
        return c;
    }

    // The line, then markers when there are few points to see.
    let clip = (left as usize + 1, top as usize + 1, right as usize, bottom as usize);
    let xy: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| (px(x), py(y))).collect();
    let mut mask = Coverage::new(clip);
    for seg in xy.windows(2) {
        mask.segment(seg[0], seg[1], 0.9 * s as f64);
    }
    if xy.len() <= 40 {
        for &p in &xy {
            mask.segment(p, p, 2.0 * s as f64);
        }
    }
    mask.paint(&mut c, LINE);
    c
}

/// Shrink the title's scale, then shorten it with "...", until it fits `avail`.
fn fit_title(title: &str, avail: i64, s: i64) -> (i64, String) {
    for scale in [s + 1, s] {
        if text_width(title, scale) <= avail {
            return (scale, title.to_owned());
        }
    }
    let keep = (avail / (6 * s) - 3).max(0) as usize;
    (s, format!("{}...", title.chars().take(keep).collect::<String>()))
}

/// Per-pixel ink coverage (0..1) inside a clip rectangle, the maximum over
/// all strokes, so overlapping segments at a joint do not darken it.
struct Coverage {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    a: Vec<f32>,
}

impl Coverage {
    fn new((x0, y0, x1, y1): (usize, usize, usize, usize)) -> Self {
        let (w, h) = (x1.saturating_sub(x0), y1.saturating_sub(y0));
        Coverage { x0, y0, w, h, a: vec![0.0; w * h] }
    }

    /// A round-capped stroke of half-width `hw` from `p` to `q`: each pixel
    /// gets coverage from its centre's distance to the segment.
    fn segment(&mut self, p: (f64, f64), q: (f64, f64), hw: f64) {
        let r = hw + 1.0;
        let bx0 = (p.0.min(q.0) - r).floor().max(self.x0 as f64) as usize;
        let by0 = (p.1.min(q.1) - r).floor().max(self.y0 as f64) as usize;
        let bx1 = ((p.0.max(q.0) + r).ceil() as usize).min(self.x0 + self.w);
        let by1 = ((p.1.max(q.1) + r).ceil() as usize).min(self.y0 + self.h);
        let (dx, dy) = (q.0 - p.0, q.1 - p.1);
        let len2 = dx * dx + dy * dy;
        for y in by0..by1 {
            for x in bx0..bx1 {
                let (cx, cy) = (x as f64 + 0.5, y as f64 + 0.5);
                let t = if len2 > 0.0 { (((cx - p.0) * dx + (cy - p.1) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
                let d = ((cx - p.0 - t * dx).powi(2) + (cy - p.1 - t * dy).powi(2)).sqrt();
                let cov = (hw + 0.5 - d).clamp(0.0, 1.0) as f32;
                let a = &mut self.a[(y - self.y0) * self.w + (x - self.x0)];
                *a = a.max(cov);
            }
        }
    }

    fn paint(&self, c: &mut Canvas, color: [u8; 3]) {
        for y in 0..self.h {
            for x in 0..self.w {
                let a = self.a[y * self.w + x];
                if a > 0.0 {
                    c.blend(self.x0 + x, self.y0 + y, color, a);
                }
            }
        }
    }
}

/// An 8-bit RGB PNG: signature, IHDR, one zlib IDAT (filter "none" per
/// row), IEND.
fn encode_png(c: &Canvas) -> io::Result<Vec<u8>> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(c.w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(c.h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // depth 8, RGB, deflate, no filter set, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let mut row = Vec::with_capacity(1 + 3 * c.w);
    for y in 0..c.h {
        row.clear();
        row.push(0);
        row.extend(c.px[y * c.w..(y + 1) * c.w].iter().flatten());
        z.write_all(&row)?;
    }
    chunk(&mut out, b"IDAT", &z.finish()?);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode with the `png` crate: (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let dec = png::Decoder::new(io::BufReader::new(fs_err::File::open(path).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count(rgb: &[u8], c: [u8; 3]) -> usize {
        rgb.chunks_exact(3).filter(|p| *p == c).count()
    }

    #[test]
    fn font_has_every_printable_ascii_glyph() {
        let src = include_str!("glyphs.txt");
        let heads = src.lines().filter(|l| l.starts_with("0x")).count();
        assert_eq!(heads, 95);
        let font = parse_font(src);
        assert!(font[1..].iter().all(|g| g.iter().any(|&r| r != 0)), "only space is blank");
        assert_eq!(glyph('1'), [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]);
        assert_eq!(glyph('é'), glyph('?'));
    }

    #[test]
    fn many_points_png_decodes_at_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let pts: Vec<(u64, f64)> = (0..2000).map(|i| (i, 3.0 * (-(i as f64) / 400.0).exp() + 0.1)).collect();
        plot_loss(&path, &pts, "train loss").unwrap();
        let (w, h, rgb) = decode(&path);
        assert_eq!((w, h), PLOT_SIZE);
        assert!(count(&rgb, LINE) > 500, "the line is drawn");
        assert!(count(&rgb, BLACK) > 1000, "axes and text are drawn");
        assert!(!dir.path().join("loss.png.tmp").exists());

        plot_loss_sized(&path, &pts, "small", 320, 200).unwrap();
        assert_eq!(decode(&path).0, 320);
        assert_eq!(decode(&path).1, 200);
        assert!(plot_loss_sized(&path, &pts, "x", 10, 10).is_err());
    }

    #[test]
    fn zero_one_and_nonfinite_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        plot_loss(&path, &[], "empty").unwrap();
        let (_, _, rgb) = decode(&path);
        assert_eq!(count(&rgb, LINE), 0);
        assert!(count(&rgb, MUTED) > 0, "says no data");

        plot_loss(&path, &[(7, 1.5)], "one").unwrap();
        assert!(count(&decode(&path).2, LINE) > 10, "a marker");

        // Same value everywhere, unsorted, with NaN and inf: still a chart.
        let pts = [(3, 2.0), (1, f64::NAN), (2, 2.0), (4, f64::INFINITY), (1, 2.0)];
        plot_loss(&path, &pts, "flat").unwrap();
        assert!(count(&decode(&path).2, LINE) > 10);
        // Only non-finite: like empty.
        plot_loss(&path, &[(1, f64::NAN)], "nan").unwrap();
        assert_eq!(count(&decode(&path).2, LINE), 0);
    }

    #[test]
    fn title_reports_skipped_points() {
        // The title text is drawn from the same string; check the layout helper.
        let c = draw_chart(&[(1, 1.0), (2, f64::NAN), (3, f64::NEG_INFINITY)], "t", 800, 500);
        let with = c.px.iter().filter(|p| **p == BLACK).count();
        let c = draw_chart(&[(1, 1.0)], "t", 800, 500);
        let without = c.px.iter().filter(|p| **p == BLACK).count();
        assert!(with > without + 200, "{with} vs {without}");
        assert_eq!(fit_title("abc", 1000, 2).0, 3);
        let (s, t) = fit_title(&"x".repeat(200), 600, 2);
        assert!(s == 2 && t.ends_with("...") && text_width(&t, 2) <= 600);
    }

    #[test]
    fn tick_steps_and_labels() {
        let (t, s) = ticks(0.0, 1000.0, 8, 1.0);
        assert_eq!(s, 200.0);
        assert_eq!(t, [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        let (t, s) = ticks(0.93, 2.41, 6, 0.0);
        assert_eq!(s, 0.5);
        assert_eq!(t.iter().map(|&v| tick_label(v, s)).collect::<Vec<_>>(), ["1.0", "1.5", "2.0"]);
        // Steps never go below 1 on the step axis.
        assert_eq!(ticks(5.0, 6.0, 8, 1.0).1, 1.0);
        assert_eq!(tick_label(3e-5, 1e-5), "3.0e-5");
        assert_eq!(tick_label(-1e-17, 0.1), "0.0");
    }
}
