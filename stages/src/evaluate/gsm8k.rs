//! lm-evaluation-harness's `gsm8k_cot` and `gsm8k` tasks, as run with
//! `lm_eval --model local-chat-completions --apply_chat_template [--fewshot_as_multiturn] [--system_instruction S]`.
//!
//! Checked against lm_eval 0.4.13 (PyPI; task yamls `gsm8k/gsm8k-cot.yaml`, `gsm8k/gsm8k.yaml`, metadata
//! version 3.0) by `scripts/interop/lm_eval_gsm8k_logic.sh`, which runs the real package against a mock
//! chat server and compares every request, filtered response, score and stderr with this module.
//!
//! # Prompt (what is sent as `messages`)
//! - `doc_to_text`: gsm8k_cot `"Q: {question}\nA:"`, gsm8k `"Question: {question}\nAnswer:"`; the question is
//!   inserted verbatim. The last user message ends with `"A:"` / `"Answer:"`, no trailing space.
//! - Few-shot exemplars: gsm8k_cot uses the 8 fixed exemplars of its yaml ([`COT_EXEMPLARS`], sampler
//!   `first_n`, so the first `num_fewshot`; more than 8 is an assertion error in lm_eval, capped here).
//!   Their answer is the yaml's `target` text. gsm8k draws exemplars from the train split (see
//!   [`select_fewshot`]); an exemplar's answer is the full train `answer` (reasoning with `<<a*b=c>>`
//!   annotations and the final `"#### N"`).
//! - `fewshot_as_multiturn` (the CLI's default once `--apply_chat_template` is given; single-turn needs
//!   `--fewshot_as_multiturn false`): `[system?, user q1, assistant a1, ..., user q]`. Assistant contents do
//!   not start with a space (the target delimiter `" "` is dropped in chat form).
//! - Single turn: `[system?, user "q1 a1\n\nq2 a2\n\n...q"]`: exemplars joined with the target delimiter
//!   `" "` and the few-shot delimiter `"\n\n"`, exactly the plain-text prompt; the system message stays
//!   separate.
//! - The system message is `--system_instruction` (the task has no description); absent or empty: none.
//! - An exemplar whose answer is empty gets no assistant turn and no delimiters (lm_eval's `has_answer`).
//!
//! # Generation (the request body)
//! `{"messages", "model", "max_tokens": 256, "temperature": 0, "stop": until[..4], "seed": 1234}`:
//! `until` is gsm8k_cot `["Q:", "</s>", "<|im_end|>"]`, gsm8k `["Question:", "</s>", "<|im_end|>"]`
//! (plus the model arg `eos_string`, if one is given, before the cap at 4). The yamls set no
//! `max_gen_toks`, so `max_tokens` is the model's `max_gen_toks` (default 256). `do_sample: false` is
//! dropped; `temperature` is `0.0` for gsm8k (in its yaml) and `0` for gsm8k_cot (the default). The seed
//! is the model arg `seed` ([`SEED`]). The response text is scored as returned: chat completions do not cut
//! at `until` client side, so the server must honour `stop`.
//!
//! # Target
//! gsm8k_cot: the text after the last `"####"` of `answer`, Python-`strip()`ped; gsm8k: the whole `answer`
//! (exact_match's `"(?s).*#### "` rule reduces it to the number).
//!
//! # Filters (`regex` then `take_first`; `take_first` keeps the first of `repeats: 1` responses)
//! `re.findall` on the raw response, searched anywhere (no anchoring, case-sensitive); no match gives
//! `"[invalid]"`; the pick is Python-`strip()`ped.
//! - strict-match, gsm8k_cot: `The answer is (\-?[0-9\.\,]+).`, first match. The final `.` is "any char but
//!   a newline", not a literal dot: `"The answer is 42"` at the very end gives `"4"`, `"The answer is 5\n"`
//!   gives `"[invalid]"`, `"The answer is 1,234."` gives `"1,234"`; `"The answer is $5"` is invalid.
//! - strict-match, gsm8k: `#### (\-?[0-9\.\,]+)`, first match; a trailing `.` stays (`"1,234."`).
//! - flexible-extract (both tasks): `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match (`group_select: -1`), then
//!   its first non-empty group; it keeps `$`, `,` and a trailing `.` (`"$5.00."`), and matches `"$$"`/`"..,,"`.
//!
//! # exact_match (both tasks: `ignore_case`, no `ignore_punctuation`, `regexes_to_ignore`)
//! Prediction and target both go through `re.sub` of `","`, `"\$"`, `"(?s).*#### "` (everything up to the
//! last `"#### "`) and `"\.$"` (Python's `$`: one final `"."`, or one just before a final `"\n"`), in
//! that order, then `str.lower()`, then `==`. numpy quirks kept: trailing NULs are dropped after each step
//! (fixed-width `<U` arrays), and the lowered string is cut to its pre-lowering length in code points
//! (`"İ"` lowers to `"i"`). So `"$1,000."` matches `"1000"`, but `"5.00"` != `"5"` and `"18.."` != `"18"`.
//!
//! # Aggregate
//! The mean of the 0/1 scores; stderr is lm_eval's `mean_stderr` (sample stddev over n-1, divided by
//! sqrt(n)), with left-to-right sums as in CPython <= 3.11 (3.12+ `sum` is compensated: the last bit may
//! differ). lm_eval reports `"N/A"` for fewer than 2 docs; [`mean_stderr`] returns NaN.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// The `seed` lm_eval's API models put in every request (model arg `seed`, default 1234).
pub const SEED: u64 = 1234;
/// lm_eval's `fewshot_random_seed` default: the seed of the few-shot sampler's `random.Random`.
pub const FEWSHOT_SEED: u32 = 1234;
/// What a filter returns when its regex does not match.
pub const INVALID: &str = "[invalid]";

/// gsm8k_cot's 8 built-in exemplars (`fewshot_config.samples` of gsm8k-cot.yaml): (question, target).
pub const COT_EXEMPLARS: [(&str, &str); 8] = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    ),
];

static STRICT_COT: LazyLock<Regex> = LazyLock::new(|| regex(r"The answer is (\-?[0-9\.\,]+)."));
static STRICT_GSM8K: LazyLock<Regex> = LazyLock::new(|| regex(r"#### (\-?[0-9\.\,]+)"));
static FLEXIBLE: LazyLock<Regex> = LazyLock::new(|| regex(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"));
static UP_TO_ANSWER: LazyLock<Regex> = LazyLock::new(|| regex(r"(?s).*#### "));

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("constant regex")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    Gsm8kCot,
    Gsm8k,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownTask(pub String);

impl fmt::Display for UnknownTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown lm_eval task `{}`: expected one of gsm8k_cot, gsm8k", self.0)
    }
}

impl std::error::Error for UnknownTask {}

impl FromStr for Task {
    type Err = UnknownTask;
    fn from_str(s: &str) -> Result<Self, UnknownTask> {
        match s {
            "gsm8k_cot" => Ok(Task::Gsm8kCot),
            "gsm8k" => Ok(Task::Gsm8k),
            _ => Err(UnknownTask(s.to_string())),
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A GSM8K row; `answer` ends with `"#### N"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doc {
    pub question: String,
    pub answer: String,
}

/// A chat message: `role` is "system", "user" or "assistant".
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Turn {
    pub role: &'static str,
    pub content: String,
}

impl Turn {
    fn new(role: &'static str, content: impl Into<String>) -> Self {
        Turn { role, content: content.into() }
    }
}

/// Generation settings: `until` is sent as `stop`, `max_tokens` as `max_tokens`; temperature 0 = greedy.
#[derive(Clone, Debug, PartialEq)]
pub struct GenSpec {
    pub until: Vec<String>,
    pub max_tokens: u32,
    pub temperature: f64,
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Task::Gsm8kCot => "gsm8k_cot",
            Task::Gsm8k => "gsm8k",
        }
    }

    pub fn default_num_fewshot(&self) -> usize {
        match self {
            Task::Gsm8kCot => 8,
            Task::Gsm8k => 5,
        }
    }

    /// gsm8k takes its exemplars from the train split ([`select_fewshot`]); gsm8k_cot has them built in.
    pub fn needs_fewshot_docs(&self) -> bool {
        *self == Task::Gsm8k
    }

    pub fn gen_spec(&self) -> GenSpec {
        let first = match self {
            Task::Gsm8kCot => "Q:",
            Task::Gsm8k => "Question:",
        };
        GenSpec { until: [first, "</s>", "<|im_end|>"].map(String::from).to_vec(), max_tokens: 256, temperature: 0.0 }
    }

    fn doc_to_text(&self, question: &str) -> String {
        match self {
            Task::Gsm8kCot => format!("Q: {question}\nA:"),
            Task::Gsm8k => format!("Question: {question}\nAnswer:"),
        }
    }

    /// The messages lm_eval sends for `doc`. `fewshot` (its first `num_fewshot` docs) is used by gsm8k only;
    /// gsm8k_cot takes the first `num_fewshot` (at most 8) of [`COT_EXEMPLARS`].
    pub fn messages(
        &self,
        doc: &Doc,
        fewshot: &[Doc],
        num_fewshot: usize,
        system: Option<&str>,
        multiturn: bool,
    ) -> Vec<Turn> {
        let shots: Vec<(String, &str)> = match self {
            Task::Gsm8kCot => COT_EXEMPLARS.iter().take(num_fewshot).map(|(q, a)| (self.doc_to_text(q), *a)).collect(),
            Task::Gsm8k => {
                fewshot.iter().take(num_fewshot).map(|d| (self.doc_to_text(&d.question), d.answer.as_str())).collect()
            }
        };
        let mut turns: Vec<Turn> =
            system.filter(|s| !s.is_empty()).map(|s| Turn::new("system", s)).into_iter().collect();
        let question = self.doc_to_text(&doc.question);
        if multiturn {
            for (q, a) in shots {
                turns.push(Turn::new("user", q));
                if !a.is_empty() {
                    turns.push(Turn::new("assistant", a));
                }
            }
            turns.push(Turn::new("user", question));
        } else {
            let mut text = String::new();
            for (q, a) in shots {
                text.push_str(&q);
                if !a.is_empty() {
                    text.push(' ');
                    text.push_str(a);
                    text.push_str("\n\n");
                }
            }
            text.push_str(&question);
            turns.push(Turn::new("user", text));
        }
        turns
    }

    /// lm_eval's `doc_to_target` for the evaluated doc.
    pub fn target(&self, doc: &Doc) -> String {
        match self {
            Task::Gsm8kCot => py_strip(doc.answer.rsplit("####").next().unwrap_or_default()).to_string(),
            Task::Gsm8k => doc.answer.clone(),
        }
    }
}

/// Python's `str.strip()`: Rust's whitespace plus the separators U+001C..U+001F.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\x1c'..='\x1f').contains(&c))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filter {
    StrictMatch,
    FlexibleExtract,
}

impl Filter {
    pub const ALL: [Filter; 2] = [Filter::StrictMatch, Filter::FlexibleExtract];

    pub fn name(&self) -> &'static str {
        match self {
            Filter::StrictMatch => "strict-match",
            Filter::FlexibleExtract => "flexible-extract",
        }
    }

    /// The filtered response: the regex pick, or `"[invalid]"`.
    pub fn apply(&self, task: Task, response: &str) -> String {
        let pick = match (self, task) {
            (Filter::StrictMatch, Task::Gsm8kCot) => STRICT_COT.captures(response).and_then(|c| c.get(1)),
            (Filter::StrictMatch, Task::Gsm8k) => STRICT_GSM8K.captures(response).and_then(|c| c.get(1)),
            (Filter::FlexibleExtract, _) => {
                FLEXIBLE.captures_iter(response).last().and_then(|c| c.iter().skip(1).flatten().find(|m| !m.is_empty()))
            }
        };
        pick.map_or(INVALID, |m| py_strip(m.as_str())).to_string()
    }
}

/// Both sides through gsm8k's `regexes_to_ignore`, then `lower()`, as numpy does it (see the module doc).
fn normalize(s: &str) -> String {
    let nul = |s: String| s.trim_end_matches('\0').to_string();
    let s = nul(s.replace(',', ""));
    let s = nul(s.replace('$', ""));
    let s = nul(UP_TO_ANSWER.replace_all(&s, "").into_owned());
    let s = nul(if let Some(head) = s.strip_suffix(".\n") {
        format!("{head}\n")
    } else {
        s.strip_suffix('.').unwrap_or(&s).to_string()
    });
    s.to_lowercase().chars().take(s.chars().count()).collect()
}

/// lm_eval's `exact_match` with gsm8k's kwargs (ignore_case, regexes_to_ignore `,` `\$` `(?s).*#### ` `\.$`).
pub fn exact_match(prediction: &str, target: &str) -> bool {
    normalize(prediction) == normalize(target)
}

/// lm_eval's `mean` aggregation: `sum(xs) / len(xs)` (NaN when empty).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// lm_eval's `mean_stderr`: sample standard deviation (n - 1) / sqrt(n); NaN for fewer than 2 values
/// (lm_eval reports "N/A").
pub fn mean_stderr(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return f64::NAN;
    }
    let mu = mean(xs);
    let var = xs.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / (xs.len() - 1) as f64;
    var.sqrt() / (xs.len() as f64).sqrt()
}

/// gsm8k's few-shot docs for the `doc_index`-th evaluated doc (0-based, in the order lm_eval builds requests:
/// the test split's order, from its first doc even under `--limit`).
///
/// lm_eval's default sampler holds one `random.Random(1234)` per task and calls
/// `rnd.sample(train, n)` once per evaluated doc, in order, so doc i gets the (i+1)-th draw. The
/// evaluated doc is not excluded (that happens only when the few-shot split is the test split). This
/// replays CPython's Mersenne Twister and `Random.sample` exactly: O(doc_index * n); use
/// [`FewshotSampler`] to walk the docs in order. `n` is capped at `train.len()` (lm_eval raises).
pub fn select_fewshot(train: &[Doc], n: usize, doc_index: usize) -> Vec<&Doc> {
    let mut sampler = FewshotSampler::new();
    for _ in 0..doc_index {
        sampler.indices(train.len(), n);
    }
    sampler.next(train, n)
}

/// lm_eval's few-shot sampler state: call [`FewshotSampler::next`] once per evaluated doc, in order.
#[derive(Clone)]
pub struct FewshotSampler(PyRandom);

impl Default for FewshotSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl FewshotSampler {
    pub fn new() -> Self {
        FewshotSampler(PyRandom::new(FEWSHOT_SEED))
    }

    /// The next doc's exemplars: `random.Random.sample(train, n)`.
    pub fn next<'a>(&mut self, train: &'a [Doc], n: usize) -> Vec<&'a Doc> {
        self.indices(train.len(), n).into_iter().map(|i| &train[i]).collect()
    }

    /// CPython's `Random.sample(range(pool), n)` (checked with CPython 3.11).
    fn indices(&mut self, pool: usize, n: usize) -> Vec<usize> {
        let n = n.min(pool);
        let mut setsize = 21;
        if n > 5 {
            setsize += 4usize.pow(log4_ceil(n * 3));
        }
        if pool <= setsize {
            let mut left: Vec<usize> = (0..pool).collect();
            (0..n)
                .map(|i| {
                    let j = self.0.below(pool - i);
                    let pick = left[j];
                    left[j] = left[pool - i - 1];
                    pick
                })
                .collect()
        } else {
            let mut seen = HashSet::new();
            (0..n)
                .map(|_| loop {
                    let j = self.0.below(pool);
                    if seen.insert(j) {
                        break j;
                    }
                })
                .collect()
        }
    }
}

/// `math.ceil(math.log(x, 4))` as CPython computes it (`log(x) / log(4)` in doubles).
fn log4_ceil(x: usize) -> u32 {
    ((x as f64).ln() / 4f64.ln()).ceil() as u32
}

/// CPython's `random.Random` (MT19937, `init_by_array` seeding) for the few calls `sample` needs.
#[derive(Clone)]
struct PyRandom {
    mt: [u32; 624],
    index: usize,
}

impl PyRandom {
    fn new(seed: u32) -> Self {
        // random.seed(int): init_by_array with the 32-bit words of abs(seed); one word here.
        let mut mt = [0u32; 624];
        mt[0] = 19_650_218;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32.wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_add(i as u32);
        }
        let key = [seed];
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_664_525)).wrapping_add(key[j]).wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            let prev = mt[i - 1] ^ (mt[i - 1] >> 30);
            mt[i] = (mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        PyRandom { mt, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % 624] & 0x7fff_ffff);
                self.mt[k] = self.mt[(k + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `_randbelow_with_getrandbits(n)`: rejection sampling on `getrandbits(n.bit_length())`.
    /// Pools are far below 2^32, where `getrandbits(k)` is one word shifted right by 32 - k.
    fn below(&mut self, n: usize) -> usize {
        let k = usize::BITS - n.leading_zeros();
        debug_assert!((1..=32).contains(&k), "pool size {n} out of range");
        loop {
            let r = (self.next_u32() >> (32 - k.min(32))) as usize;
            if r < n {
                return r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn doc(q: &str, a: &str) -> Doc {
        Doc { question: q.into(), answer: a.into() }
    }

    fn roles(turns: &[Turn]) -> Vec<&str> {
        turns.iter().map(|t| t.role).collect()
    }

    #[test]
    fn parse_task() {
        assert_eq!("gsm8k_cot".parse::<Task>(), Ok(Task::Gsm8kCot));
        assert_eq!("gsm8k".parse::<Task>().map(|t| t.name()), Ok("gsm8k"));
        let err = "gsm8k-cot".parse::<Task>().unwrap_err().to_string();
        assert!(err.contains("gsm8k_cot") && err.contains("gsm8k-cot"), "{err}");
    }

    #[test]
    fn strict_match() {
        let cot = |r| Filter::StrictMatch.apply(Task::Gsm8kCot, r);
        assert_eq!(cot("So 3 + 4 = 7. The answer is 1,234."), "1,234");
        assert_eq!(cot("The answer is -12."), "-12");
        assert_eq!(cot("The answer is 42"), "4"); // the pattern's final `.` eats a char
        assert_eq!(cot("The answer is 5\n"), INVALID);
        assert_eq!(cot("The answer is $5.00."), INVALID);
        assert_eq!(cot("The answer is 3. The answer is 4."), "3."); // first match
        assert_eq!(cot("THE ANSWER IS 3."), INVALID);
        assert_eq!(cot("#### 3"), INVALID);
        let gsm = |r| Filter::StrictMatch.apply(Task::Gsm8k, r);
        assert_eq!(gsm("#### -7\n#### 8"), "-7");
        assert_eq!(gsm("work\n#### 1,234.\n"), "1,234.");
        assert_eq!(gsm("The answer is 3."), INVALID);
    }

    #[test]
    fn flexible_extract() {
        for task in [Task::Gsm8kCot, Task::Gsm8k] {
            let flex = |r| Filter::FlexibleExtract.apply(task, r);
            assert_eq!(flex("The answer is 1,234."), "1,234.");
            assert_eq!(flex("It costs $5.00"), "$5.00");
            assert_eq!(flex("a 12 b 3"), "3"); // last match, second group
            assert_eq!(flex("from 5 to -3"), "-3");
            assert_eq!(flex("$-3"), "-3");
            assert_eq!(flex("dots ..,,"), "..,,");
            assert_eq!(flex("no digits"), INVALID);
            assert_eq!(flex(""), INVALID);
            assert_eq!(flex("\u{ff15}"), INVALID); // fullwidth digits are not [0-9]
        }
    }

    #[test]
    fn exact_match_rules() {
        assert!(exact_match("1,234", "1234"));
        assert!(exact_match("$1,000.", "1000"));
        assert!(exact_match("18.", "18"));
        assert!(exact_match("42", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 42"));
        assert!(exact_match("[INVALID]", "[invalid]"));
        assert!(exact_match("5.\0", "5"));
        assert!(!exact_match("5.00", "5"));
        assert!(!exact_match("18..", "18"));
        assert!(!exact_match("-3", "3"));
        assert!(!exact_match("18.\n", "18"));
        assert!(exact_match("18.\n", "18\n"));
        assert!(!exact_match("\u{130}", "i\u{307}")); // numpy keeps the lowered "İ" at one code point
    }

    #[test]
    fn stderr() {
        let xs = [1.0, 0.0, 1.0, 1.0];
        assert_eq!(mean(&xs), 0.75);
        assert!((mean_stderr(&xs) - 0.25).abs() < 1e-15); // sqrt(0.25 / 3) / 2 * sqrt(3)
        assert!((mean_stderr(&[0.0, 1.0]) - 0.5).abs() < 1e-15);
        assert!(mean_stderr(&[1.0]).is_nan());
    }

    #[test]
    fn cot_messages() {
        let d = doc("How many?", "Some work.\n#### 1,200 \n");
        let task = Task::Gsm8kCot;
        assert_eq!(task.target(&d), "1,200");
        let multi = task.messages(&d, &[], 8, Some("Be brief."), true);
        assert_eq!(multi.len(), 1 + 8 * 2 + 1);
        assert_eq!(&roles(&multi)[..4], ["system", "user", "assistant", "user"]);
        assert_eq!(multi[1].content, format!("Q: {}\nA:", COT_EXEMPLARS[0].0));
        assert_eq!(multi[2].content, COT_EXEMPLARS[0].1);
        assert_eq!(multi[17], Turn::new("user", "Q: How many?\nA:"));
        let single = task.messages(&d, &[], 2, None, false);
        assert_eq!(roles(&single), ["user"]);
        let (q0, a0) = COT_EXEMPLARS[0];
        let (q1, a1) = COT_EXEMPLARS[1];
        assert_eq!(single[0].content, format!("Q: {q0}\nA: {a0}\n\nQ: {q1}\nA: {a1}\n\nQ: How many?\nA:"));
        assert_eq!(task.messages(&d, &[], 0, Some(""), true), [Turn::new("user", "Q: How many?\nA:")]);
        assert_eq!(task.messages(&d, &[], 20, None, true).len(), 17);
    }

    #[test]
    fn gsm8k_messages() {
        let task = Task::Gsm8k;
        let d = doc("Q0?", "w\n#### 5");
        let shots = [doc("A?", "x\n#### 1"), doc("B?", ""), doc("C?", "z\n#### 3")];
        assert_eq!(task.target(&d), "w\n#### 5");
        let multi = task.messages(&d, &shots, 3, Some("sys"), true);
        assert_eq!(roles(&multi), ["system", "user", "assistant", "user", "user", "assistant", "user"]);
        assert_eq!(multi[2].content, "x\n#### 1");
        assert_eq!(multi[6].content, "Question: Q0?\nAnswer:");
        let single = task.messages(&d, &shots, 2, Some("sys"), false);
        assert_eq!(roles(&single), ["system", "user"]);
        assert_eq!(single[1].content, "Question: A?\nAnswer: x\n#### 1\n\nQuestion: B?\nAnswer:Question: Q0?\nAnswer:");
        let spec = task.gen_spec();
        assert_eq!(spec.until, ["Question:", "</s>", "<|im_end|>"]);
        assert_eq!((spec.max_tokens, spec.temperature), (256, 0.0));
        assert_eq!(Task::Gsm8kCot.gen_spec().until[0], "Q:");
    }

    #[test]
    fn python_random_sample() {
        // random.Random(1234).sample(range(40), 5) twice, and range(7473) (the GSM8K train size) once.
        let mut s = FewshotSampler::new();
        assert_eq!(s.indices(40, 5), [28, 7, 0, 5, 37]);
        assert_eq!(s.indices(40, 5), [2, 5, 6, 22, 15]);
        assert_eq!(FewshotSampler::new().indices(7473, 5), [6374, 3610, 957, 61, 742]);
        let train: Vec<Doc> = (0..40).map(|i| doc(&i.to_string(), "")).collect();
        let picked: Vec<&str> = select_fewshot(&train, 5, 1).iter().map(|d| d.question.as_str()).collect();
        assert_eq!(picked, ["2", "5", "6", "22", "15"]);
    }

    /// Compares with the dump of scripts/interop/lm_eval_gsm8k_logic.py (real lm_eval behind a mock
    /// server); skipped unless PIPE_LMEVAL_GSM8K_FIXTURE names that JSON file.
    #[test]
    fn lm_eval_fixture() {
        let Some(path) = std::env::var_os("PIPE_LMEVAL_GSM8K_FIXTURE") else {
            eprintln!("skipped: PIPE_LMEVAL_GSM8K_FIXTURE is not set");
            return;
        };
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.to_string_lossy()));
        let fx: Value = serde_json::from_slice(&bytes).expect("fixture JSON");
        let docs = |k: &str| -> Vec<Doc> { serde_json::from_value(fx[k].clone()).expect("docs") };
        let (test, train) = (docs("test"), docs("train"));
        let bits = |v: &Value| v.as_u64().expect("f64 bits");
        let mut failures = Vec::new();
        let mut fail = |what: String| {
            if failures.len() < 40 {
                eprintln!("MISMATCH {what}");
            }
            failures.push(what);
        };
        let mut checked = 0;
        for run in fx["runs"].as_array().expect("runs") {
            let task: Task = run["task"].as_str().expect("task").parse().expect("task name");
            let multiturn = run["multiturn"].as_bool().expect("multiturn");
            let system = run["system"].as_str();
            let n = run["num_fewshot"].as_u64().map_or(task.default_num_fewshot(), |n| n as usize);
            let tag = format!("{task} multiturn={multiturn} system={} n={n}", system.is_some());
            if run["effective_num_fewshot"] != json!(n) {
                fail(format!("{tag}: n-shot {}", run["effective_num_fewshot"]));
            }
            let spec = task.gen_spec();
            let mut sampler = FewshotSampler::new();
            let mut scores: [Vec<f64>; 2] = Default::default();
            for (i, sample) in run["samples"].as_array().expect("samples").iter().enumerate() {
                let d = &test[i];
                let tag = format!("{tag} doc {i}");
                if sample["doc_id"] != json!(i) || sample["doc"] != json!(d) {
                    fail(format!("{tag}: samples out of order"));
                }
                let shots: Vec<Doc> = if task.needs_fewshot_docs() {
                    sampler.next(&train, n).into_iter().cloned().collect()
                } else {
                    Vec::new()
                };
                if task.needs_fewshot_docs() && select_fewshot(&train, n, i).len() != shots.len() {
                    fail(format!("{tag}: select_fewshot"));
                }
                let ours = json!(task.messages(d, &shots, n, system, multiturn));
                if ours != sample["messages"] {
                    fail(format!("{tag}: messages\n ours: {ours}\n lm_eval: {}", sample["messages"]));
                }
                let req = run["requests"].as_array().expect("requests").iter().find(|r| r["doc_index"] == json!(i));
                let want = json!({
                    "messages": ours, "model": "mock", "max_tokens": spec.max_tokens, "temperature": spec.temperature,
                    "stop": spec.until.iter().take(4).collect::<Vec<_>>(), "seed": SEED,
                });
                match req.map(|r| &r["body"]) {
                    // JSON 0 (gsm8k_cot) and 0.0 (gsm8k) are both temperature 0.
                    Some(body) if body["temperature"].as_f64() == Some(spec.temperature) => {
                        let mut body = body.clone();
                        body["temperature"] = json!(spec.temperature);
                        if body != want {
                            fail(format!("{tag}: request\n ours: {want}\n lm_eval: {body}"));
                        }
                    }
                    other => fail(format!("{tag}: request {other:?}")),
                }
                let target = task.target(d);
                if sample["target"] != json!(target) {
                    fail(format!("{tag}: target {target:?} vs {}", sample["target"]));
                }
                let response = sample["resps"][0][0].as_str().expect("response");
                for (k, f) in Filter::ALL.iter().enumerate() {
                    let got = f.apply(task, response);
                    if sample["filtered"][f.name()] != json!(got) {
                        fail(format!(
                            "{tag}: {} of {response:?}: {got:?} vs {}",
                            f.name(),
                            sample["filtered"][f.name()]
                        ));
                    }
                    let score = if exact_match(&got, &target) { 1.0 } else { 0.0 };
                    if sample["exact_match"][f.name()] != json!(score) {
                        fail(format!("{tag}: exact_match({got:?}, {target:?}) = {score}"));
                    }
                    scores[k].push(score);
                }
                checked += 1;
            }
            for (k, f) in Filter::ALL.iter().enumerate() {
                let m = &run["metrics"][f.name()];
                let (mu, se) = (mean(&scores[k]), mean_stderr(&scores[k]));
                if mu.to_bits() != bits(&m["exact_match_bits"]) || se.to_bits() != bits(&m["stderr_bits"]) {
                    fail(format!("{tag}: {} mean {mu} stderr {se} vs {} {}", f.name(), m["exact_match"], m["stderr"]));
                }
            }
        }
        for case in fx["filter_cases"].as_array().expect("filter_cases") {
            let response = case["response"].as_str().expect("response");
            for task in [Task::Gsm8kCot, Task::Gsm8k] {
                for f in Filter::ALL {
                    let key = format!("{task}/{}", f.name());
                    if case["filtered"][&key] != json!(f.apply(task, response)) {
                        fail(format!(
                            "{key} of {response:?}: {:?} vs {}",
                            f.apply(task, response),
                            case["filtered"][&key]
                        ));
                    }
                }
            }
            checked += 1;
        }
        for case in fx["exact_match_cases"].as_array().expect("exact_match_cases") {
            let (p, t) = (case["prediction"].as_str().expect("p"), case["target"].as_str().expect("t"));
            if json!(if exact_match(p, t) { 1.0 } else { 0.0 }) != case["score"] {
                fail(format!("exact_match({p:?}, {t:?}) vs {}", case["score"]));
            }
            checked += 1;
        }
        for case in fx["stderr_cases"].as_array().expect("stderr_cases") {
            let xs: Vec<f64> = serde_json::from_value(case["xs"].clone()).expect("xs");
            if mean_stderr(&xs).to_bits() != bits(&case["stderr_bits"]) {
                fail(format!("mean_stderr of {} values: {} vs {}", xs.len(), mean_stderr(&xs), case["stderr"]));
            }
            checked += 1;
        }
        for case in fx["random_samples"].as_array().expect("random_samples") {
            let (pool, n) = (case["pool"].as_u64().expect("pool") as usize, case["n"].as_u64().expect("n") as usize);
            let mut s = FewshotSampler::new();
            for (k, draw) in case["draws"].as_array().expect("draws").iter().enumerate() {
                if json!(s.indices(pool, n)) != *draw {
                    fail(format!("Random(1234).sample(range({pool}), {n}) draw {k}: expected {draw}"));
                }
            }
            checked += 1;
        }
        assert!(failures.is_empty(), "{} mismatches with lm_eval (first ones above)", failures.len());
        eprintln!("PASS: {checked} cases match lm_eval {}", fx["lm_eval_version"]);
    }
}
