//! Spectrum: pick which weight matrices to train by their signal-to-noise
//! ratio, as `spectrum.py` of github.com/cognitivecomputations/spectrum
//! does, and read/write its files.
//!
//! - [`snr`]: one matrix's SNR from its singular values (faer, f64).
//! - [`scan`]: every `*.weight` of a model -> [`Scan`] (module name -> SNR
//!   and module type), matrices in parallel.
//! - [`select`]: the top `top_percent` of each module type, as the
//!   `unfrozen_parameters` regexes spectrum writes (lm_head and embed_tokens
//!   always first); [`matches`] applies such a list with Python `re.match`
//!   semantics.
//! - [`write_snr_json`] / [`write_unfrozen_yaml`]: `snr_results_*.json` and
//!   `*_unfrozenparameters_*percent.yaml` in spectrum's layout.
//!
//! Faithful to spectrum where it matters for the selection:
//! - keys are module names (the parameter name less `.weight`); a module's
//!   type is the part of its name after the first all-digit component
//!   (`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`), or the whole
//!   name when there is none (`lm_head`, `model.embed_tokens`, `model.norm`);
//! - a 1-D weight (a norm) is a `1 x n` matrix: one singular value, zero
//!   spread, so no noise and an SNR of infinity, as in spectrum's published
//!   `snr_results_*.json` (a later spectrum.py revision substitutes a noise
//!   of 1 there, giving 1.0; the selection is the same, as every norm of a
//!   type ties either way);
//! - types are ordered as spectrum sorts them (by first dotted component,
//!   then by name), modules within a type in model order (numeric layer
//!   index), and ties in SNR keep that order (Python's stable sort).
//!
//! Spectrum computes in f32 on torch; this computes in f64, so values agree
//! to roughly f32 precision, not bit for bit.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use candle_core::{DType, Error, Result, Tensor};
use rayon::prelude::*;
use regex::Regex;

/// Spectrum's SNR of one weight matrix (a 1-D weight is taken as `1 x n`):
/// with `S` its singular values (descending), `sigma = IQR(S) / 1.349`
/// (quantiles linearly interpolated, as numpy and torch), `tau = sigma * (1 +
/// sqrt(min(n, m) / max(n, m)))` (the Marchenko-Pastur edge),
/// `SNR = sum(S > tau) / sum(S <= tau) / S[0]`; infinity when the noise sum
/// is 0 (including an all-zero matrix).
pub fn snr(w: &Tensor) -> Result<f64> {
    let (rows, cols) = match w.dims() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        dims => candle_core::bail!("spectrum: expected a 1-D or 2-D weight, got shape {dims:?}"),
    };
    if rows == 0 || cols == 0 {
        candle_core::bail!("spectrum: cannot take the SNR of an empty ({rows}, {cols}) weight");
    }
    let mat = if w.dtype() == DType::F64 {
        let v = w.flatten_all()?.to_vec1::<f64>()?;
        faer::Mat::<f64>::from_fn(rows, cols, |i, j| v[i * cols + j])
    } else {
        // bf16/f16 widen to f32 exactly; one host copy instead of an f64 tensor.
        let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        faer::Mat::<f64>::from_fn(rows, cols, |i, j| v[i * cols + j] as f64)
    };
    let s = mat
        .singular_values()
        .map_err(|e| Error::Msg(format!("spectrum: SVD of a ({rows}, {cols}) weight failed: {e:?}")))?;
    Ok(snr_of_singular_values(&s, rows, cols))
}

/// The SNR from singular values sorted in descending order.
fn snr_of_singular_values(s: &[f64], n: usize, m: usize) -> f64 {
    let mut asc = s.to_vec();
    asc.sort_by(f64::total_cmp);
    let sigma = (quantile(&asc, 0.75) - quantile(&asc, 0.25)) / 1.349;
    let beta = if n < m { n as f64 / m as f64 } else { m as f64 / n as f64 };
    let tau = sigma * ((1.0 + beta.sqrt()) * (1.0 + beta.sqrt())).sqrt();
    let signal: f64 = s.iter().filter(|&&v| v > tau).sum();
    let noise: f64 = s.iter().filter(|&&v| v <= tau).sum();
    let ratio = if noise != 0.0 { signal / noise } else { f64::INFINITY };
    ratio / s[0]
}

/// Linear-interpolation quantile of ascending `v` (numpy's default method,
/// torch.quantile's `linear`), including their lerp formula.
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let t = pos - lo as f64;
    let (a, b) = (v[lo], v[hi]);
    if t < 0.5 {
        a + (b - a) * t
    } else {
        b - (b - a) * (1.0 - t)
    }
}

/// Spectrum's module type of a weight parameter: `model.layers.3.self_attn.q_proj.weight`
/// -> `self_attn.q_proj`, `lm_head.weight` -> `lm_head`,
/// `model.embed_tokens.weight` -> `model.embed_tokens`. `None` for a name
/// that is not a `.weight` (biases and buffers are not scanned).
pub fn module_type(param_name: &str) -> Option<String> {
    param_name.strip_suffix(".weight").map(type_of_module)
}

fn type_of_module(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.iter().position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        Some(i) => parts[i + 1..].join("."),
        None => module.to_string(),
    }
}

/// A model's SNR scan, keyed as spectrum keys it: by module name (the
/// parameter name less `.weight`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// Module name -> SNR.
    pub snr: BTreeMap<String, f64>,
    /// Module name -> module type ([`module_type`]).
    pub types: BTreeMap<String, String>,
}

impl Scan {
    /// The modules grouped by type in spectrum's order: types by their first
    /// dotted component, then by name; modules in model order (names
    /// compared with numeric components as numbers).
    pub fn groups(&self) -> Vec<(&str, Vec<&str>)> {
        let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (module, ty) in &self.types {
            by_type.entry(ty.as_str()).or_default().push(module.as_str());
        }
        let mut groups: Vec<(&str, Vec<&str>)> = by_type.into_iter().collect();
        groups.sort_by(|(a, _), (b, _)| {
            let cat = |t: &str| t.split('.').next().unwrap_or("").to_string();
            cat(a).cmp(&cat(b)).then_with(|| a.cmp(b))
        });
        for (_, modules) in &mut groups {
            modules.sort_by(|a, b| natural_cmp(a, b));
        }
        groups
    }
}

/// Dotted names compared component by component, all-digit components as
/// numbers (`layers.2` < `layers.10`), the model order of HF checkpoints.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let key = |s: &str| -> Vec<(u8, u128, String)> {
        s.split('.')
            .map(|p| match p.parse::<u128>() {
                Ok(n) if p.bytes().all(|b| b.is_ascii_digit()) => (0, n, String::new()),
                _ => (1, 0, p.to_string()),
            })
            .collect()
    };
    key(a).cmp(&key(b))
}

/// Scans every `NAME.weight` (1-D or 2-D) for its SNR, in parallel; other
/// parameters (biases, buffers) are skipped. Pass tied weights under each
/// name spectrum should list (e.g. `lm_head.weight` as well as
/// `model.embed_tokens.weight`).
pub fn scan(weights: impl IntoIterator<Item = (String, Tensor)>) -> Result<Scan> {
    let items: Vec<(String, String, Tensor)> = weights
        .into_iter()
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?.to_string();
            Some((name, module, t))
        })
        .collect();
    let results: Vec<Result<(String, f64)>> = items
        .par_iter()
        .map(|(name, module, t)| {
            let v = snr(t).map_err(|e| Error::Msg(format!("{name}: {e}")))?;
            Ok((module.clone(), v))
        })
        .collect();
    let mut out = Scan::default();
    for r in results {
        let (module, v) = r?;
        out.types.insert(module.clone(), type_of_module(&module));
        out.snr.insert(module, v);
    }
    Ok(out)
}

/// The patterns spectrum writes under `unfrozen_parameters:`:
/// `^lm_head.weight$` and `^model.embed_tokens.weight$` always, then for
/// each type (in [`Scan::groups`] order) the names of its top
/// `int(count * top_percent / 100)` modules by SNR, highest first (ties in
/// model order, NaN last). Module names are used as regexes unanchored at
/// the end, so they match the module's weight and bias.
pub fn select(scan: &Scan, top_percent: f64) -> Vec<String> {
    let mut out = vec!["^lm_head.weight$".to_string(), "^model.embed_tokens.weight$".to_string()];
    for (_, modules) in scan.groups() {
        let mut ranked: Vec<(&str, f64)> =
            modules.iter().map(|m| (*m, scan.snr.get(*m).copied().unwrap_or(f64::NAN))).collect();
        ranked.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
            (false, false) => b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal),
            (x, y) => x.cmp(&y),
        });
        // Python's int(len * p / 100): truncation; `as` also maps NaN and
        // negatives to 0.
        let k = ((ranked.len() as f64) * top_percent / 100.0) as usize;
        out.extend(ranked.into_iter().take(k).map(|(m, _)| m.to_string()));
    }
    out
}

/// True when `param_name` matches any pattern the way Python's `re.match`
/// does (anchored at the start only). Patterns use the `regex` crate's
/// syntax (no look-around or backreferences); an invalid one is an error
/// even when an earlier one matches.
pub fn matches(patterns: &[String], param_name: &str) -> Result<bool> {
    let mut any = false;
    for p in patterns {
        let re = Regex::new(&format!("^(?:{p})")).map_err(|e| {
            Error::Msg(format!(
                "unfrozen_parameters: `{p}` is not a valid regular expression: {e}\n\
                 hint: patterns are matched from the start of the parameter name, like Python's re.match; \
                 look-around and backreferences are not supported"
            ))
        })?;
        any = any || re.is_match(param_name);
    }
    Ok(any)
}

/// Writes the scan as spectrum's `snr_results_*.json`: Python's
/// `json.dump(..., indent=4)` of `{module: {"snr": value, "type": type}}` in
/// [`Scan::groups`] order, with Python's float spelling (`Infinity`, `NaN`,
/// `1e-05`).
pub fn write_snr_json(scan: &Scan, path: &Path) -> Result<()> {
    fs_err::write(path, snr_json(scan))?;
    Ok(())
}

fn snr_json(scan: &Scan) -> String {
    let mut s = String::new();
    let groups = scan.groups();
    if groups.is_empty() {
        return "{}".to_string();
    }
    s.push_str("{\n");
    let mut first = true;
    for (ty, modules) in groups {
        for m in modules {
            if !first {
                s.push_str(",\n");
            }
            first = false;
            let v = scan.snr.get(m).copied().unwrap_or(f64::NAN);
            let _ = write!(
                s,
                "    {}: {{\n        \"snr\": {},\n        \"type\": {}\n    }}",
                py_json_str(m),
                py_float(v),
                py_json_str(ty)
            );
        }
    }
    s.push_str("\n}");
    s
}

/// Python's `json.dumps` of a string (`ensure_ascii=True`).
fn py_json_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            '\u{8}' => s.push_str("\\b"),
            '\u{c}' => s.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(s, "\\u{unit:04x}");
                }
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// Python's `repr(float)`: shortest round-trip digits, positional for
/// exponents in [-4, 16), else `d.ddde+XX`.
fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{v}");
        if s.contains('.') {
            s
        } else {
            s + ".0"
        }
    } else {
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// Writes `unfrozen_parameters:` and the patterns as a YAML list, as
/// spectrum's `*_unfrozenparameters_*percent.yaml`: a `# TYPE layers`
/// comment before each run of module names of one type (spectrum also
/// writes one for a type none of whose modules was selected; a list of
/// patterns does not carry those). Patterns that are not plain YAML scalars
/// are single-quoted.
pub fn write_unfrozen_yaml(patterns: &[String], path: &Path) -> Result<()> {
    fs_err::write(path, unfrozen_yaml(patterns))?;
    Ok(())
}

fn unfrozen_yaml(patterns: &[String]) -> String {
    let mut s = String::from("unfrozen_parameters:\n");
    let mut last_type: Option<String> = None;
    for p in patterns {
        let is_module = !p.starts_with('^') && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if is_module {
            let ty = type_of_module(p);
            if last_type.as_deref() != Some(ty.as_str()) {
                let _ = writeln!(s, "# {ty} layers");
                last_type = Some(ty);
            }
        }
        let _ = writeln!(s, "- {}", yaml_scalar(p));
    }
    s
}

fn yaml_scalar(p: &str) -> String {
    let plain = !p.is_empty()
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.^$".contains(&b))
        && p.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'^' || b == b'_')
        && !matches!(
            p.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n" | "nan" | "inf"
        );
    if plain {
        p.to_string()
    } else {
        format!("'{}'", p.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `noise_plus_signal` of `scripts/reference/spectrum_ref.py`, in the
    /// same f32 operations.
    fn noise_plus_signal(rows: usize, cols: usize, amp: f32) -> Tensor {
        let mut v = Vec::with_capacity(rows * cols);
        for i in 0..rows as i64 {
            for j in 0..cols as i64 {
                let noise = ((31 * i + 17 * j + 7 * i * j) % 97 - 48) as f32 / 48.0;
                let signal = (amp * ((i % 5) - 2) as f32 * ((j % 3) - 1) as f32) / 4.0;
                v.push(noise + signal);
            }
        }
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// `python3 scripts/reference/spectrum_ref.py` (numpy 2.4
    /// `np.linalg.svd`, f64; every singular value is at least 0.5% away
    /// from tau, so the signal/noise split is not a rounding accident).
    #[test]
    fn snr_matches_the_numpy_reference() {
        for (rows, cols, amp, want) in [
            (24, 40, 0.0, 0.5350717812921089),
            (24, 40, 3.0, 0.16314617437483747),
            (48, 16, 1.5, 2.6296167523557172),
            (64, 64, 8.0, 0.018882904383088466),
        ] {
            let w = noise_plus_signal(rows, cols, amp);
            let got = snr(&w).unwrap();
            assert!((got - want).abs() <= 1e-10 * want, "({rows}, {cols}, {amp}): {got} vs {want}");
            // Any float dtype, and the transpose (same singular values and shape ratio).
            let got64 = snr(&w.to_dtype(DType::F64).unwrap()).unwrap();
            assert!((got64 - want).abs() <= 1e-10 * want);
            let got_t = snr(&w.t().unwrap()).unwrap();
            assert!((got_t - want).abs() <= 1e-10 * want);
        }
    }

    #[test]
    fn snr_edge_cases() {
        let dev = Device::Cpu;
        // A norm: 1 x n, one singular value, no noise.
        let norm = Tensor::new(&[1f32, 0.5, 2.0, 1.0], &dev).unwrap();
        assert_eq!(snr(&norm).unwrap(), f64::INFINITY);
        // All singular values equal: IQR 0, tau 0, no noise.
        let eye = Tensor::eye(8, DType::F32, &dev).unwrap();
        assert_eq!(snr(&eye).unwrap(), f64::INFINITY);
        assert_eq!(snr(&Tensor::zeros((4, 6), DType::BF16, &dev).unwrap()).unwrap(), f64::INFINITY);
        // diag(4, 3, 2, 1): q25 = 1.75, q75 = 3.25, sigma = 1.5/1.349, tau = 2 sigma
        // = 2.2239; signal 4 + 3, noise 2 + 1 -> 7/3/4.
        let d = Tensor::from_vec(vec![4f32, 0., 0., 0., 0., 3., 0., 0., 0., 0., 2., 0., 0., 0., 0., 1.], (4, 4), &dev)
            .unwrap();
        assert!((snr(&d).unwrap() - 7.0 / 3.0 / 4.0).abs() < 1e-15);
        assert!(snr(&Tensor::zeros((2, 2, 2), DType::F32, &dev).unwrap()).is_err());
        assert!(snr(&Tensor::zeros((0, 3), DType::F32, &dev).unwrap()).is_err());
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 4.0, 8.0, 16.0];
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&v, 0.75), 8.0);
        let v = [1.0, 2.0, 4.0, 8.0];
        // positions 0.75 and 2.25: np.quantile gives 1.75 and 5.0.
        assert_eq!(quantile(&v, 0.25), 1.75);
        assert_eq!(quantile(&v, 0.75), 5.0);
        assert_eq!(quantile(&[3.0], 0.75), 3.0);
    }

    #[test]
    fn module_types_follow_spectrum() {
        let t = |n: &str| module_type(n);
        assert_eq!(t("model.layers.3.self_attn.q_proj.weight").as_deref(), Some("self_attn.q_proj"));
        assert_eq!(t("model.layers.12.mlp.down_proj.weight").as_deref(), Some("mlp.down_proj"));
        assert_eq!(t("model.layers.0.input_layernorm.weight").as_deref(), Some("input_layernorm"));
        assert_eq!(t("model.layers.1.mlp.experts.7.w1.weight").as_deref(), Some("mlp.experts.7.w1"));
        assert_eq!(t("lm_head.weight").as_deref(), Some("lm_head"));
        assert_eq!(t("model.embed_tokens.weight").as_deref(), Some("model.embed_tokens"));
        assert_eq!(t("model.norm.weight").as_deref(), Some("model.norm"));
        assert_eq!(t("model.layers.3.self_attn.q_proj.bias"), None);
        assert_eq!(t("model.layers.3.self_attn.q_proj"), None);
    }

    /// A fake 12-layer model's scan with hand-set SNRs.
    fn fake_scan() -> Scan {
        let mut s = Scan::default();
        let mut put = |m: String, v: f64| {
            s.types.insert(m.clone(), type_of_module(&m));
            s.snr.insert(m, v);
        };
        for l in 0..12 {
            put(format!("model.layers.{l}.self_attn.q_proj"), [5., 1., 9., 3., 7., 2., 8., 4., 6., 0.5, 10., 11.][l]);
            put(format!("model.layers.{l}.mlp.down_proj"), (l % 4) as f64); // ties
            put(format!("model.layers.{l}.input_layernorm"), f64::INFINITY);
        }
        put("model.norm".into(), f64::INFINITY);
        put("model.embed_tokens".into(), 8.28);
        put("lm_head".into(), 8.28);
        s
    }

    #[test]
    fn groups_follow_spectrum_order() {
        let s = fake_scan();
        let g = s.groups();
        let types: Vec<&str> = g.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            types,
            ["input_layernorm", "lm_head", "mlp.down_proj", "model.embed_tokens", "model.norm", "self_attn.q_proj"]
        );
        assert_eq!(
            g[0].1[..3],
            ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.layers.2.input_layernorm"]
        );
        assert_eq!(g[0].1[11], "model.layers.11.input_layernorm");
    }

    #[test]
    fn select_takes_the_top_fraction_per_type() {
        let s = fake_scan();
        let sel = select(&s, 25.0); // int(12 * 25 / 100) = 3 per layer type; int(0.25) = 0 for singletons
        assert_eq!(
            sel,
            [
                "^lm_head.weight$",
                "^model.embed_tokens.weight$",
                "model.layers.0.input_layernorm",
                "model.layers.1.input_layernorm",
                "model.layers.2.input_layernorm",
                // down_proj SNR = l % 4: the three 3.0s, in layer order
                "model.layers.3.mlp.down_proj",
                "model.layers.7.mlp.down_proj",
                "model.layers.11.mlp.down_proj",
                "model.layers.11.self_attn.q_proj",
                "model.layers.10.self_attn.q_proj",
                "model.layers.2.self_attn.q_proj",
            ]
        );
        assert_eq!(select(&s, 0.0).len(), 2);
        // 100%: everything, lm_head and embed_tokens also under their own types.
        let all = select(&s, 100.0);
        assert_eq!(all.len(), 2 + s.snr.len());
        assert!(all.contains(&"lm_head".to_string()));
        // int(12 * 33.3 / 100) = int(3.996) = 3
        assert_eq!(select(&s, 33.3).len(), 2 + 3 * 3);
    }

    #[test]
    fn matches_is_python_re_match() {
        let s = fake_scan();
        let pats = select(&s, 25.0);
        let m = |n: &str| matches(&pats, n).unwrap();
        assert!(m("lm_head.weight"));
        assert!(m("model.embed_tokens.weight"));
        assert!(!m("model.embed_tokens.weight_scale"), "anchored at the end by `$`");
        assert!(m("model.layers.3.mlp.down_proj.weight"));
        assert!(m("model.layers.3.mlp.down_proj.bias"));
        assert!(!m("model.layers.30.mlp.down_proj.weight"), "`.` needs a character, and `0` is not `.mlp`");
        assert!(!m("model.layers.4.mlp.down_proj.weight"));
        assert!(m("model.layers.2.self_attn.q_proj.weight"));
        assert!(!m("model.layers.2.self_attn.k_proj.weight"));
        // Anchored at the start only, like re.match.
        let p = vec!["layers".to_string()];
        assert!(!matches(&p, "model.layers.0.mlp.up_proj.weight").unwrap());
        let p = vec![r"model\.layers\.\d+\.mlp".to_string()];
        assert!(matches(&p, "model.layers.0.mlp.up_proj.weight").unwrap());
        assert!(!matches(&[], "lm_head.weight").unwrap());
        let bad = vec!["lm_head".to_string(), "(?<=x)y".to_string()];
        let err = matches(&bad, "lm_head.weight").unwrap_err().to_string();
        assert!(err.contains("`(?<=x)y` is not a valid regular expression"), "{err}");
    }

    #[test]
    fn yaml_is_spectrums_layout() {
        let s = fake_scan();
        let yaml = unfrozen_yaml(&select(&s, 25.0));
        assert_eq!(
            yaml,
            "unfrozen_parameters:\n\
             - ^lm_head.weight$\n\
             - ^model.embed_tokens.weight$\n\
             # input_layernorm layers\n\
             - model.layers.0.input_layernorm\n\
             - model.layers.1.input_layernorm\n\
             - model.layers.2.input_layernorm\n\
             # mlp.down_proj layers\n\
             - model.layers.3.mlp.down_proj\n\
             - model.layers.7.mlp.down_proj\n\
             - model.layers.11.mlp.down_proj\n\
             # self_attn.q_proj layers\n\
             - model.layers.11.self_attn.q_proj\n\
             - model.layers.10.self_attn.q_proj\n\
             - model.layers.2.self_attn.q_proj\n"
        );
        let hand = unfrozen_yaml(&[r"model\.layers\.\d+\.mlp".to_string(), "it's: #".to_string()]);
        assert_eq!(hand, "unfrozen_parameters:\n- 'model\\.layers\\.\\d+\\.mlp'\n- 'it''s: #'\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.yaml");
        write_unfrozen_yaml(&select(&s, 25.0), &path).unwrap();
        assert_eq!(fs_err::read_to_string(&path).unwrap(), yaml);
    }

    #[test]
    fn json_is_pythons_json_dump() {
        let mut s = Scan::default();
        for (m, v) in [
            ("model.layers.0.input_layernorm", f64::INFINITY),
            ("model.layers.10.self_attn.q_proj", 0.05244118347764015),
            ("model.layers.2.self_attn.q_proj", 1e-5),
            ("lm_head", 8.0),
        ] {
            s.types.insert(m.to_string(), type_of_module(m));
            s.snr.insert(m.to_string(), v);
        }
        assert_eq!(
            snr_json(&s),
            r#"{
    "model.layers.0.input_layernorm": {
        "snr": Infinity,
        "type": "input_layernorm"
    },
    "lm_head": {
        "snr": 8.0,
        "type": "lm_head"
    },
    "model.layers.2.self_attn.q_proj": {
        "snr": 1e-05,
        "type": "self_attn.q_proj"
    },
    "model.layers.10.self_attn.q_proj": {
        "snr": 0.05244118347764015,
        "type": "self_attn.q_proj"
    }
}"#
        );
        assert_eq!(snr_json(&Scan::default()), "{}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snr.json");
        write_snr_json(&s, &path).unwrap();
        assert_eq!(fs_err::read_to_string(&path).unwrap(), snr_json(&s));
    }

    #[test]
    fn floats_are_spelled_as_python_repr() {
        for (v, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (8.281196594238281, "8.281196594238281"),
            (0.0001, "0.0001"),
            (0.00001234, "1.234e-05"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.5e300, "1.5e+300"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(py_float(v), want, "{v}");
        }
        assert_eq!(py_json_str("a\"b\\é"), r#""a\"b\\\u00e9""#);
    }

    #[test]
    fn scan_reads_weights_and_skips_the_rest() {
        let dev = Device::Cpu;
        let w = noise_plus_signal(24, 40, 3.0);
        let scan = scan(vec![
            ("model.layers.0.self_attn.q_proj.weight".to_string(), w.clone()),
            ("model.layers.0.self_attn.q_proj.bias".to_string(), Tensor::ones(24, DType::F32, &dev).unwrap()),
            ("model.layers.0.input_layernorm.weight".to_string(), Tensor::ones(40, DType::F32, &dev).unwrap()),
            ("model.rotary_emb.inv_freq".to_string(), Tensor::ones(8, DType::F32, &dev).unwrap()),
        ])
        .unwrap();
        assert_eq!(scan.snr.len(), 2);
        assert!((scan.snr["model.layers.0.self_attn.q_proj"] - 0.16314617437483747).abs() < 1e-10);
        assert_eq!(scan.snr["model.layers.0.input_layernorm"], f64::INFINITY);
        assert_eq!(scan.types["model.layers.0.self_attn.q_proj"], "self_attn.q_proj");
        let err = super::scan(vec![("x.weight".to_string(), Tensor::zeros((2, 2, 2), DType::F32, &dev).unwrap())])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.weight: spectrum: expected a 1-D or 2-D weight"), "{err}");
    }

    /// Spectrum publishes SmolLM-135M `model.layers.0.self_attn.q_proj` =
    /// 0.05244118347764015. Only a Q4_1 GGUF of the different SmolLM2-135M-Instruct
    /// is at hand, so this prints what it gives and asserts nothing about
    /// the value: `PIPE_SNR_GGUF=/path/model.gguf cargo test -p pipe-stages
    /// spectrum::tests::gguf_layer0_q_proj -- --nocapture`. (GGUF permutes
    /// q rows for RoPE; a row permutation leaves singular values alone.)
    #[test]
    fn gguf_layer0_q_proj() {
        let Some(path) = std::env::var_os("PIPE_SNR_GGUF") else {
            return;
        };
        let mut f = fs_err::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let mut names: Vec<String> = content
            .tensor_infos
            .keys()
            .filter(|n| n.starts_with("blk.0.attn_") || n.as_str() == "token_embd.weight")
            .cloned()
            .collect();
        names.sort();
        for name in names {
            let q = content.tensor(&mut f, &name, &Device::Cpu).unwrap();
            let w = q.dequantize(&Device::Cpu).unwrap();
            eprintln!("{name} {:?} ({:?}): snr = {}", w.dims(), q.dtype(), snr(&w).unwrap());
        }
    }
}
