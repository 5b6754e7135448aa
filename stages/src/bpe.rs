//! [`Encoder`]: turns text into token ids exactly as `tokenizers::Tokenizer::
//! encode(text, false)` does, fast for the common byte-level BPE tokenizers
//! (GPT-2, SmolLM2, StarCoder: no normalizer, an optional `Digits`
//! pre-tokenizer, `ByteLevel` with the GPT-2 regex, a plain BPE model).
//!
//! The fast path skips what makes `tokenizers` slow for this job (normalized
//! strings, alignments, per-token strings and offsets): it splits the text at
//! added tokens (leftmost-longest, as `tokenizers`' AddedVocabulary), splits
//! each piece with a hand-written scanner equivalent to the GPT-2 regex, and
//! runs BPE per word with per-thread caches of words and of whole segments
//! (a repeated system prompt is tokenized once per thread). Any
//! `tokenizer.json` it does not fully understand falls back to `tokenizers`
//! itself; [`Encoder::fallback_reason`] says why. Exactness is tested against
//! `tokenizers` in `tests/cli/bpe.rs` and by `benches/pack.sh` against
//! `transformers`.

use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use pipe_engine::stage::StageFailure;
use serde_json::Value;
use tokenizers::Tokenizer;

/// A tokenizer: the fast exact path when the configuration allows it, else
/// `tokenizers`.
pub struct Encoder {
    fast: Option<Box<FastBpe>>,
    hf: Option<Box<Tokenizer>>,
    fallback: Option<String>,
}

impl Encoder {
    /// Load `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Encoder, StageFailure> {
        let bytes = fs_err::read(path)?;
        Self::from_bytes(&bytes).map_err(|e| {
            StageFailure::new(format!("{}: {}", path.display(), e.message))
                .hint("the model input must hold tokenizer.json")
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Encoder, StageFailure> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| StageFailure::new(e.to_string()))?;
        match FastBpe::new(&v) {
            Ok(f) => Ok(Encoder { fast: Some(Box::new(f)), hf: None, fallback: None }),
            Err(why) => {
                let t = Tokenizer::from_bytes(bytes).map_err(|e| StageFailure::new(e.to_string()))?;
                Ok(Encoder { fast: None, hf: Some(Box::new(t)), fallback: Some(why) })
            }
        }
    }

    /// Why the fast path is not used (`None`: it is).
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The largest token id.
    pub fn max_id(&self) -> u32 {
        match (&self.fast, &self.hf) {
            (Some(f), _) => f.added_ids.values().copied().chain([f.token_len.len() as u32 - 1]).max().unwrap_or(0),
            (_, Some(t)) => t.get_vocab(true).values().copied().max().unwrap_or(0),
            _ => 0,
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match (&self.fast, &self.hf) {
            (Some(f), _) => f.token_to_id(token),
            (_, Some(t)) => t.token_to_id(token),
            _ => None,
        }
    }

    /// Append the ids of `text` (no special tokens added) to `ids`, and when
    /// `starts` is given, each token's start as a byte offset into `text`
    /// (a token inside a multi-byte character may start inside it).
    pub fn encode(&self, text: &str, ids: &mut Vec<u32>, starts: Option<&mut Vec<u32>>) -> Result<(), StageFailure> {
        if let Some(f) = &self.fast {
            f.encode(text, ids, starts);
            return Ok(());
        }
        let t = self.hf.as_ref().expect("one of fast and hf");
        let enc = t.encode(text, false).map_err(|e| StageFailure::new(format!("tokenizer: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        if let Some(s) = starts {
            s.extend(enc.get_offsets().iter().map(|(a, _)| *a as u32));
        }
        Ok(())
    }
}

/// FxHash: keys here are short byte strings and id pairs; SipHash would cost
/// more than the BPE it caches.
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for b in chunks.remainder() {
            self.write_u64(*b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64)
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// A piece of the input: an added token (id, start) or text (start, end).
enum Piece {
    Added(u32, usize),
    Text(usize, usize),
}

/// One set of added tokens matched in one pass, leftmost-longest.
#[derive(Default)]
struct AddedSet {
    /// first byte -> (content, id), longest first
    by_first: Vec<Vec<(Box<[u8]>, u32)>>,
}

impl AddedSet {
    fn new(tokens: &[(String, u32)]) -> AddedSet {
        let mut by_first: Vec<Vec<(Box<[u8]>, u32)>> = (0..256).map(|_| Vec::new()).collect();
        for (s, id) in tokens {
            // A later duplicate of the same content wins, as in a map.
            let list = &mut by_first[s.as_bytes()[0] as usize];
            list.retain(|(c, _)| **c != *s.as_bytes());
            list.push((s.as_bytes().into(), *id));
        }
        for l in &mut by_first {
            l.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
        }
        AddedSet { by_first }
    }

    fn is_empty(&self) -> bool {
        self.by_first.iter().all(Vec::is_empty)
    }

    /// Split `text[from..to]` into added tokens and the text between them.
    fn split(&self, text: &[u8], from: usize, to: usize, out: &mut Vec<Piece>) {
        let mut start = from;
        let mut i = from;
        while i < to {
            let cands = &self.by_first[text[i] as usize];
            let hit = cands.iter().find(|(c, _)| text[i..to].starts_with(c));
            match hit {
                Some((c, id)) => {
                    if start < i {
                        out.push(Piece::Text(start, i));
                    }
                    out.push(Piece::Added(*id, i));
                    i += c.len();
                    start = i;
                }
                None => i += 1,
            }
        }
        if start < to {
            out.push(Piece::Text(start, to));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DigitSplit {
    None,
    Individual,
    Contiguous,
}

struct FastBpe {
    id: u64,
    /// non-normalized added tokens, then normalized ones (two passes, as tokenizers)
    added: [AddedSet; 2],
    added_ids: HashMap<String, u32>,
    vocab: HashMap<String, u32>,
    digits: DigitSplit,
    gpt2_regex: bool,
    byte_id: [u32; 256],
    /// byte length of each vocab id (bytes its characters stand for; 1 for
    /// the unknown token when it stands for a byte missing from the vocab)
    token_len: Vec<u32>,
    /// (left << 32 | right) -> (rank, merged id)
    merges: FxMap<u64, (u32, u32)>,
}

/// GPT-2's byte -> unicode table, as byte-level BPE vocabularies spell bytes.
fn byte_chars() -> [char; 256] {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || (0xAE..=0xFF).contains(&x);
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        out[b as usize] = if printable(b) {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid")
        };
    }
    out
}

fn get_bool(v: &Value, k: &str) -> Option<bool> {
    v.get(k).and_then(Value::as_bool)
}

fn only_keys(v: &Value, what: &str, keys: &[&str]) -> Result<(), String> {
    if let Some(o) = v.as_object() {
        if let Some(k) = o.keys().find(|k| !keys.contains(&k.as_str())) {
            return Err(format!("{what} has `{k}`"));
        }
    }
    Ok(())
}

fn is_null(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_null)
}

/// Post-processors that change nothing in `encode(text, false)`'s ids and
/// token starts.
fn post_processor_ok(v: &Value) -> bool {
    match v.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => get_bool(v, "trim_offsets") == Some(false),
        Some("TemplateProcessing" | "BertProcessing") => true,
        Some("Sequence") => {
            v.get("processors").and_then(Value::as_array).is_some_and(|a| a.iter().all(post_processor_ok))
        }
        _ => false,
    }
}

impl FastBpe {
    fn new(v: &Value) -> Result<FastBpe, String> {
        only_keys(
            v,
            "tokenizer.json",
            &[
                "version",
                "truncation",
                "padding",
                "added_tokens",
                "normalizer",
                "pre_tokenizer",
                "post_processor",
                "decoder",
                "model",
            ],
        )?;
        for k in ["truncation", "padding", "normalizer"] {
            if !is_null(v.get(k)) {
                return Err(format!("a {k} is set"));
            }
        }
        if let Some(p) = v.get("post_processor").filter(|p| !p.is_null()) {
            if !post_processor_ok(p) {
                return Err("the post_processor may change offsets".into());
            }
        }
        // pre-tokenizer: [Digits], ByteLevel (no prefix space)
        let pre = v.get("pre_tokenizer").ok_or("no pre_tokenizer")?;
        let steps: Vec<&Value> = match pre.get("type").and_then(Value::as_str) {
            Some("Sequence") => {
                pre.get("pretokenizers").and_then(Value::as_array).ok_or("bad Sequence")?.iter().collect()
            }
            _ => vec![pre],
        };
        let (mut digits, mut byte_level) = (DigitSplit::None, None);
        for (i, s) in steps.iter().enumerate() {
            match s.get("type").and_then(Value::as_str) {
                Some("Digits") if i + 1 < steps.len() && digits == DigitSplit::None => {
                    digits = match get_bool(s, "individual_digits") {
                        Some(true) => DigitSplit::Individual,
                        _ => DigitSplit::Contiguous,
                    }
                }
                Some("ByteLevel") if i + 1 == steps.len() => {
                    if get_bool(s, "add_prefix_space") != Some(false) {
                        return Err("ByteLevel add_prefix_space".into());
                    }
                    byte_level = Some(get_bool(s, "use_regex").unwrap_or(true));
                }
                _ => return Err(format!("pre-tokenizer {s}")),
            }
        }
        let gpt2_regex = byte_level.ok_or("no ByteLevel pre-tokenizer")?;

        let model = v.get("model").ok_or("no model")?;
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err("the model is not BPE".into());
        }
        only_keys(
            model,
            "the BPE model",
            &[
                "type",
                "dropout",
                "unk_token",
                "continuing_subword_prefix",
                "end_of_word_suffix",
                "fuse_unk",
                "byte_fallback",
                "ignore_merges",
                "vocab",
                "merges",
            ],
        )?;
        for k in ["dropout", "continuing_subword_prefix", "end_of_word_suffix"] {
            if !is_null(model.get(k)) {
                return Err(format!("BPE {k} is set"));
            }
        }
        for k in ["byte_fallback", "ignore_merges"] {
            if get_bool(model, k) == Some(true) {
                return Err(format!("BPE {k}"));
            }
        }
        let vocab: HashMap<String, u32> = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or("no BPE vocab")?
            .iter()
            .map(|(k, v)| v.as_u64().map(|id| (k.clone(), id as u32)).ok_or("bad vocab id"))
            .collect::<Result<_, _>>()?;
        let chars = byte_chars();
        let char_byte: HashMap<char, u8> = chars.iter().enumerate().map(|(b, c)| (*c, b as u8)).collect();
        // A byte missing from the vocab becomes the unknown token, as in
        // `tokenizers` (SmolLM2 lacks a few control and never-valid bytes).
        let unk = model.get("unk_token").and_then(Value::as_str).and_then(|u| vocab.get(u).copied());
        let mut byte_id = [0u32; 256];
        let mut uses_unk = false;
        for (b, c) in chars.iter().enumerate() {
            byte_id[b] = match vocab.get(c.to_string().as_str()) {
                Some(id) => *id,
                None => {
                    uses_unk = true;
                    unk.ok_or("the vocab lacks a byte and has no unk_token")?
                }
            };
        }
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        let mut token_len = vec![0u32; max_id + 1];
        for (t, id) in &vocab {
            token_len[*id as usize] = t.chars().map(|c| u32::from(char_byte.contains_key(&c))).sum();
        }
        let mut merges: FxMap<u64, (u32, u32)> = FxMap::default();
        for (rank, m) in model.get("merges").and_then(Value::as_array).ok_or("no merges")?.iter().enumerate() {
            let (a, b) = match m {
                Value::String(s) => s.split_once(' ').ok_or("bad merge")?,
                Value::Array(p) if p.len() == 2 => {
                    (p[0].as_str().ok_or("bad merge")?, p[1].as_str().ok_or("bad merge")?)
                }
                _ => return Err("bad merge".into()),
            };
            let id = |s: &str| vocab.get(s).copied().ok_or("a merge names a token not in the vocab");
            let new = id(&format!("{a}{b}"))?;
            merges.insert((id(a)? as u64) << 32 | id(b)? as u64, (rank as u32, new));
        }
        if let (true, Some(u)) = (uses_unk, unk) {
            // The unknown token then stands for one byte, and must not merge.
            if merges.iter().any(|(k, (_, new))| *new == u || (k >> 32) as u32 == u || *k as u32 == u) {
                return Err("the unk_token takes part in merges".into());
            }
            token_len[u as usize] = 1;
        }

        let mut sets: [Vec<(String, u32)>; 2] = [Vec::new(), Vec::new()];
        let mut added_ids = HashMap::new();
        let mut next_id = vocab.len() as u32;
        for t in v.get("added_tokens").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            for k in ["single_word", "lstrip", "rstrip"] {
                if get_bool(t, k) == Some(true) {
                    return Err(format!("an added token has {k}"));
                }
            }
            let content = t.get("content").and_then(Value::as_str).ok_or("bad added token")?;
            if content.is_empty() {
                continue;
            }
            if added_ids.contains_key(content) {
                return Err(format!("the added token {content:?} is listed twice"));
            }
            // The id `tokenizers` gives it, whatever the file says: the
            // model's for a token in the vocab, else the next free one after
            // the vocab's size.
            let id = match vocab.get(content) {
                Some(id) => *id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            let normalized = get_bool(t, "normalized").unwrap_or(!get_bool(t, "special").unwrap_or(false));
            sets[usize::from(normalized)].push((content.to_string(), id));
            added_ids.insert(content.to_string(), id);
        }
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Ok(FastBpe {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            added: [AddedSet::new(&sets[0]), AddedSet::new(&sets[1])],
            added_ids,
            vocab,
            digits,
            gpt2_regex,
            byte_id,
            token_len,
            merges,
        })
    }

    fn token_to_id(&self, t: &str) -> Option<u32> {
        self.added_ids.get(t).or_else(|| self.vocab.get(t)).copied()
    }

    fn encode(&self, text: &str, ids: &mut Vec<u32>, mut starts: Option<&mut Vec<u32>>) {
        let b = text.as_bytes();
        let mut pieces = Vec::new();
        let mut second = Vec::new();
        self.added[0].split(b, 0, b.len(), &mut pieces);
        if !self.added[1].is_empty() {
            for p in pieces.drain(..) {
                match p {
                    Piece::Text(s, e) => self.added[1].split(b, s, e, &mut second),
                    added => second.push(added),
                }
            }
            std::mem::swap(&mut pieces, &mut second);
        }
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.owner != self.id {
                *c = Caches { owner: self.id, ..Caches::default() };
            }
            for p in pieces {
                match p {
                    Piece::Added(id, s) => {
                        ids.push(id);
                        if let Some(st) = starts.as_deref_mut() {
                            st.push(s as u32);
                        }
                    }
                    Piece::Text(s, e) => self.segment(&mut c, &text[s..e], s as u32, ids, starts.as_deref_mut()),
                }
            }
        })
    }

    /// Text between added tokens, through the segment cache.
    fn segment(&self, c: &mut Caches, seg: &str, base: u32, ids: &mut Vec<u32>, starts: Option<&mut Vec<u32>>) {
        if let Some((i, s)) = c.segments.get(seg) {
            ids.extend_from_slice(i);
            if let Some(st) = starts {
                st.extend(s.iter().map(|x| x + base));
            }
            return;
        }
        let (mut si, mut ss) = (Vec::new(), Vec::new());
        let mut word = |c: &mut Caches, w: &str, at: usize| {
            let n = si.len();
            self.word(c, w.as_bytes(), &mut si);
            let mut o = at as u32;
            for id in &si[n..] {
                ss.push(o);
                o += self.token_len[*id as usize];
            }
        };
        let mut piece = |c: &mut Caches, p: &str, at: usize| {
            if self.gpt2_regex {
                gpt2_words(p, |s, e| word(c, &p[s..e], at + s));
            } else {
                word(c, p, at);
            }
        };
        match self.digits {
            DigitSplit::None => piece(c, seg, 0),
            d => {
                let mut start = 0;
                let mut it = seg.char_indices().peekable();
                while let Some((i, ch)) = it.next() {
                    if ch.is_numeric() {
                        if start < i {
                            piece(c, &seg[start..i], start);
                        }
                        let mut end = i + ch.len_utf8();
                        if d == DigitSplit::Contiguous {
                            while let Some((j, ch)) = it.next_if(|(_, ch)| ch.is_numeric()) {
                                end = j + ch.len_utf8();
                            }
                        }
                        piece(c, &seg[i..end], i);
                        start = end;
                    }
                }
                if start < seg.len() {
                    piece(c, &seg[start..], start);
                }
            }
        }
        ids.extend_from_slice(&si);
        if let Some(st) = starts {
            st.extend(ss.iter().map(|x| x + base));
        }
        if c.segments.len() >= SEGMENT_CACHE {
            c.segments.clear();
        }
        c.segments.insert(seg.into(), (si.into(), ss.into()));
    }

    fn rank(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.merges.get(&((a as u64) << 32 | b as u64)).copied()
    }

    /// BPE of one pre-tokenized word, through the word cache.
    fn word(&self, c: &mut Caches, w: &[u8], out: &mut Vec<u32>) {
        if w.len() == 1 {
            out.push(self.byte_id[w[0] as usize]);
            return;
        }
        if let Some(ids) = c.words.get(w) {
            out.extend_from_slice(ids);
            return;
        }
        let n = out.len();
        if w.len() <= 64 {
            self.bpe_small(w, out);
        } else {
            self.bpe_heap(w, out);
        }
        if c.words.len() >= WORD_CACHE {
            c.words.clear();
        }
        c.words.insert(w.into(), out[n..].into());
    }

    /// Merge the lowest-ranked pair (leftmost on ties) until none is left.
    fn bpe_small(&self, w: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = w.iter().map(|b| self.byte_id[*b as usize]).collect();
        let mut ranks: Vec<(u32, u32)> =
            syms.windows(2).map(|p| self.rank(p[0], p[1]).unwrap_or((u32::MAX, 0))).collect();
        loop {
            let mut best = 0;
            for (k, r) in ranks.iter().enumerate() {
                if r.0 < ranks[best].0 {
                    best = k;
                }
            }
            if ranks.is_empty() || ranks[best].0 == u32::MAX {
                break;
            }
            syms[best] = ranks[best].1;
            syms.remove(best + 1);
            ranks.remove(best);
            if best > 0 {
                ranks[best - 1] = self.rank(syms[best - 1], syms[best]).unwrap_or((u32::MAX, 0));
            }
            if best < ranks.len() {
                ranks[best] = self.rank(syms[best], syms[best + 1]).unwrap_or((u32::MAX, 0));
            }
        }
        out.extend_from_slice(&syms);
    }

    /// The same merges for long words in O(n log n), as `tokenizers` does it:
    /// a heap of (rank, position) over a linked list of symbols.
    fn bpe_heap(&self, w: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let n = w.len();
        let mut sym: Vec<u32> = w.iter().map(|b| self.byte_id[*b as usize]).collect();
        let mut alive = vec![true; n];
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut next: Vec<usize> = (0..n).map(|i| if i + 1 == n { NONE } else { i + 1 }).collect();
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some((r, new)) = self.rank(sym[i], sym[i + 1]) {
                heap.push(std::cmp::Reverse((r, i, new)));
            }
        }
        while let Some(std::cmp::Reverse((r, i, new))) = heap.pop() {
            if !alive[i] || next[i] == NONE {
                continue;
            }
            let j = next[i];
            if self.rank(sym[i], sym[j]) != Some((r, new)) {
                continue;
            }
            sym[i] = new;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE {
                if let Some((r, new)) = self.rank(sym[prev[i]], sym[i]) {
                    heap.push(std::cmp::Reverse((r, prev[i], new)));
                }
            }
            if next[i] != NONE {
                if let Some((r, new)) = self.rank(sym[i], sym[next[i]]) {
                    heap.push(std::cmp::Reverse((r, i, new)));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(sym[i]);
            i = next[i];
        }
    }
}

const WORD_CACHE: usize = 1 << 18;
const SEGMENT_CACHE: usize = 4096;

type Ids = Box<[u32]>;

#[derive(Default)]
struct Caches {
    owner: u64,
    words: FxMap<Box<[u8]>, Ids>,
    segments: FxMap<Box<str>, (Ids, Ids)>,
}

thread_local! {
    static CACHE: RefCell<Caches> = RefCell::new(Caches::default());
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Space,
    Letter,
    Number,
    Other,
}

/// `\s`, `\p{L}`, `\p{N}` as the `regex` crate (under `tokenizers`' fancy-regex)
/// defines them; a table for the BMP, the regexes themselves above it.
struct Classes {
    bmp: Vec<Class>,
    res: [regex::Regex; 3],
}

static CLASSES: LazyLock<Classes> = LazyLock::new(|| {
    let res = [r"\A\s\z", r"\A\p{L}\z", r"\A\p{N}\z"].map(|r| regex::Regex::new(r).expect("valid regex"));
    let bmp = (0..0x10000u32).map(|c| char::from_u32(c).map_or(Class::Other, |c| slow_class(&res, c))).collect();
    Classes { bmp, res }
});

fn slow_class(res: &[regex::Regex; 3], c: char) -> Class {
    let mut buf = [0u8; 4];
    let s = c.encode_utf8(&mut buf);
    if res[0].is_match(s) {
        Class::Space
    } else if res[1].is_match(s) {
        Class::Letter
    } else if res[2].is_match(s) {
        Class::Number
    } else {
        Class::Other
    }
}

#[inline]
fn class(c: char) -> Class {
    if c.is_ascii() {
        let b = c as u8;
        if b.is_ascii_alphabetic() {
            Class::Letter
        } else if b.is_ascii_digit() {
            Class::Number
        } else if matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
            Class::Space
        } else {
            Class::Other
        }
    } else if (c as u32) < 0x10000 {
        CLASSES.bmp[c as usize]
    } else {
        slow_class(&CLASSES.res, c)
    }
}

/// The matches of GPT-2's pre-tokenizer regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// in `s`, as byte ranges; they cover `s`.
fn gpt2_words(s: &str, mut emit: impl FnMut(usize, usize)) {
    let b = s.as_bytes();
    let at = |i: usize| -> (char, usize) {
        let c = s[i..].chars().next().expect("in bounds");
        (c, c.len_utf8())
    };
    // end of the run of `cl` characters starting at `i`
    let run = |mut i: usize, cl: Class| -> usize {
        while i < b.len() {
            let (c, n) = at(i);
            if class(c) != cl {
                break;
            }
            i += n;
        }
        i
    };
    let mut i = 0;
    while i < b.len() {
        let (c, n) = at(i);
        if c == '\'' {
            let r = &b[i + 1..];
            let k = match r {
                [b's' | b't' | b'm' | b'd', ..] => 1,
                [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => 2,
                _ => 0,
            };
            if k > 0 {
                emit(i, i + 1 + k);
                i += 1 + k;
                continue;
            }
        }
        if c == ' ' && i + 1 < b.len() {
            let cl = class(at(i + 1).0);
            if cl != Class::Space {
                let e = run(i + 1, cl);
                emit(i, e);
                i = e;
                continue;
            }
        }
        let cl = class(c);
        let e = run(i + n, cl);
        if cl == Class::Space && e < b.len() {
            // `\s+(?!\S)` gives back the last space before a non-space;
            // `\s+` takes a lone one.
            let last = s[..e].char_indices().next_back().map_or(i, |(j, _)| j);
            if last > i {
                emit(i, last);
                i = last;
                continue;
            }
        }
        emit(i, e);
        i = e;
    }
}
