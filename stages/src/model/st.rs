//! Streaming safetensors: a writer that takes the tensor list up front and
//! the bytes one tensor at a time (so a model never has to fit in memory),
//! sharding like `save_pretrained` (`model-00001-of-00002.safetensors` +
//! `model.safetensors.index.json`), and a header reader for the other side.
//!
//! Format: u64 little-endian header length, a JSON header (`{name: {dtype,
//! shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, padded with
//! spaces to 8 bytes), then the data. Tensors are written in name order, so
//! the same tensors always give the same bytes.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use pipe_engine::stage::StageFailure;
use serde_json::{json, Value as Json};

/// Output dtype of float tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    /// The safetensors spelling.
    pub fn st(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
            DType::F16 => "F16",
        }
    }
    /// The `torch_dtype` spelling of config.json.
    pub fn torch(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
    pub fn from_st(s: &str) -> Option<DType> {
        match s {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::Bf16),
            "F16" => Some(DType::F16),
            _ => None,
        }
    }

    /// Append `xs` in this dtype (little-endian, round to nearest even).
    pub fn encode(self, xs: &[f32], out: &mut Vec<u8>) {
        match self {
            DType::F32 => xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            DType::Bf16 => xs.iter().for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
            DType::F16 => xs.iter().for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        }
    }

    /// Decode little-endian bytes of this dtype to f32.
    pub fn decode(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            DType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            DType::Bf16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            DType::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
        }
    }
}

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    /// safetensors dtype (`F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    pub nbytes: u64,
}

/// Parse a size like `5GB`, `500MB`, `2GiB` or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v >= 1.0 && v.is_finite()).then_some(v as u64)
}

/// Write `tensors` (any order; written sorted by name) into `dir`: one
/// `model.safetensors`, or shards of at most `max_shard` bytes plus an index.
/// `fill(i, w)` must write exactly `tensors[i].nbytes` bytes. Returns the
/// files written.
pub fn write_model(
    dir: &Path,
    tensors: &[Planned],
    max_shard: u64,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<(), StageFailure>,
) -> Result<Vec<String>, StageFailure> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    // Greedy shards in name order (a tensor larger than the limit gets its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for &i in &order {
        let n = tensors[i].nbytes;
        if size > 0 && size + n > max_shard {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard").push(i);
    }
    let count = shards.len();
    let name_of = |k: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        }
    };
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let file = name_of(k);
        let path = dir.join(&file);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for &i in shard {
            let t = &tensors[i];
            header.insert(
                t.name.clone(),
                json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.nbytes]}),
            );
            off += t.nbytes;
            weight_map.insert(t.name.clone(), json!(file));
        }
        total += off;
        let mut h = serde_json::to_vec(&Json::Object(header)).map_err(|e| StageFailure::new(e.to_string()))?;
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let f = fs_err::File::create(&path)?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for &i in shard {
            let mut cw = Counting { inner: &mut w, n: 0 };
            fill(i, &mut cw)?;
            if cw.n != tensors[i].nbytes {
                return Err(StageFailure::new(format!(
                    "internal error: tensor `{}` wrote {} bytes, expected {}",
                    tensors[i].name, cw.n, tensors[i].nbytes
                )));
            }
        }
        w.into_inner().map_err(|e| StageFailure::new(format!("{}: {}", path.display(), e.error())))?.sync_all()?;
        files.push(file);
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).map_err(|e| StageFailure::new(e.to_string()))?;
        fs_err::write(dir.join("model.safetensors.index.json"), text + "\n")?;
        files.push("model.safetensors.index.json".into());
    }
    Ok(files)
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A tensor entry of a safetensors header.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// The tensors of one safetensors file (header only).
#[derive(Debug)]
pub struct Header {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Entry>,
}

fn bad(path: &Path, why: impl std::fmt::Display) -> StageFailure {
    StageFailure::new(format!("{}: not a valid safetensors file: {why}", path.display()))
        .hint("the weights may be truncated (an interrupted download?) or not safetensors at all")
}

pub fn read_header(path: &Path) -> Result<Header, StageFailure> {
    let mut f = fs_err::File::open(path)?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad(path, "shorter than 8 bytes"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > len {
        return Err(bad(path, format!("header length {n} does not fit a {len}-byte file")));
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h)?;
    let v: Json = serde_json::from_slice(&h).map_err(|e| bad(path, format!("header is not JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| bad(path, "header is not a JSON object"))?;
    let base = 8 + n;
    let mut tensors = BTreeMap::new();
    for (name, e) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = e.get("dtype").and_then(Json::as_str).ok_or_else(|| bad(path, format!("`{name}` has no dtype")))?;
        let shape: Vec<usize> = e
            .get("shape")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad(path, format!("`{name}` has no shape")))?;
        let offs: Vec<u64> = e
            .get("data_offsets")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(Json::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(path, format!("`{name}` has no valid data_offsets")))?;
        let (start, end) = (base + offs[0], base + offs[1]);
        if end > len {
            return Err(bad(path, format!("`{name}` ends at byte {end}, past the end of the file ({len})")));
        }
        if let Some(d) = DType::from_st(dtype) {
            let want = shape.iter().product::<usize>() as u64 * d.size();
            if want != end - start {
                return Err(bad(path, format!("`{name}`: {} bytes for shape {shape:?} {dtype}", end - start)));
            }
        }
        tensors.insert(name.clone(), Entry { dtype: dtype.to_string(), shape, start, end });
    }
    Ok(Header { path: path.to_path_buf(), tensors })
}

/// Read one tensor's bytes.
pub fn read_bytes(f: &mut fs_err::File, e: &Entry) -> Result<Vec<u8>, StageFailure> {
    let mut buf = vec![0u8; (e.end - e.start) as usize];
    f.seek(SeekFrom::Start(e.start))?;
    f.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("1.5MB"), Some(1_500_000));
        assert_eq!(parse_size("2KiB"), Some(2048));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("5 parsecs"), None);
    }
}
