//! Print a model's logits for token ids, for interop checks against
//! `transformers` / `peft` (scripts/interop/).
//!
//! cargo run --release -p pipe-stages --example logits -- [--f64] BASE_DIR [ADAPTER_DIR] < ids.json > logits.json
//! stdin: `[[id, ...], ...]` (one sequence per list); stdout: `[[[logit; vocab]; len], ...]`,
//! computed in f32 (in f64 with `--f64`, to tell rounding from a real difference).

use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device};
use pipe_stages::nn::llama::{Llama, Row, TrainSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let dtype = if args.first().is_some_and(|a| a == "--f64") {
        args.remove(0);
        DType::F64
    } else {
        DType::F32
    };
    let Some(base) = args.first() else {
        return Err("usage: logits [--f64] BASE_DIR [ADAPTER_DIR] < ids.json".into());
    };
    let dev = Device::Cpu;
    let model = match args.get(1) {
        Some(a) => Llama::load_peft(Path::new(base), Path::new(a), dtype, &dev)?,
        None => Llama::load(Path::new(base), dtype, &dev, &TrainSpec::default())?,
    };
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let seqs: Vec<Vec<u32>> = serde_json::from_str(&input)?;
    let mut out = Vec::new();
    for ids in seqs {
        let n = ids.len();
        let row =
            Row { labels: vec![-100; n], position_ids: (0..n as u32).collect(), seq_lens: vec![n], input_ids: ids };
        let b = model.batch(&[row])?;
        out.push(model.logits(&b)?.to_dtype(DType::F64)?.to_vec2::<f64>()?);
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
