//! Diagnostics for pipeline files: `file:line:col`, the offending line with a
//! caret, and a hint. Rendering is plain text (no colour) so tests can
//! snapshot it and logs stay readable.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// The text of every file a pipeline was read from (the pipeline itself and
/// its `params:` files), so errors can quote the offending line.
#[derive(Default, Clone)]
pub struct Sources {
    files: Vec<Arc<(PathBuf, String)>>,
}

impl Sources {
    pub fn add(&mut self, display: PathBuf, text: String) -> usize {
        self.files.push(Arc::new((display, text)));
        self.files.len() - 1
    }

    pub fn path(&self, id: usize) -> Option<&PathBuf> {
        self.files.get(id).map(|f| &f.0)
    }

    fn line(&self, id: usize, line: usize) -> Option<&str> {
        self.files.get(id).and_then(|f| f.1.lines().nth(line.saturating_sub(1)))
    }
}

/// A position in a source file (1-based line and column) and the width of the
/// thing it points at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loc {
    pub file: usize,
    pub line: usize,
    pub col: usize,
    pub len: usize,
}

/// One error about a pipeline file, ready to render.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub message: String,
    pub loc: Option<Loc>,
    pub hint: Option<String>,
    pub rendered: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, loc: Option<Loc>) -> Self {
        Diagnostic { message: message.into(), loc, hint: None, rendered: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn maybe_hint(mut self, hint: Option<String>) -> Self {
        if hint.is_some() {
            self.hint = hint;
        }
        self
    }

    /// Render against the sources; the result is kept for `Display`.
    pub fn render(mut self, sources: &Sources) -> Self {
        let mut out = format!("error: {}\n", self.message);
        if let Some(loc) = self.loc {
            let path = sources.path(loc.file).map(|p| p.display().to_string()).unwrap_or_else(|| "<unknown>".into());
            let num = loc.line.to_string();
            let pad = " ".repeat(num.len());
            out.push_str(&format!("{pad}--> {path}:{}:{}\n", loc.line, loc.col));
            if let Some(text) = sources.line(loc.file, loc.line) {
                let caret_pad: String =
                    text.chars().take(loc.col.saturating_sub(1)).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
                out.push_str(&format!("{pad} |\n{num} | {text}\n"));
                out.push_str(&format!("{pad} | {caret_pad}{}\n", "^".repeat(loc.len.max(1))));
            }
        }
        if let Some(h) = &self.hint {
            out.push_str(&format!("hint: {h}\n"));
        }
        self.rendered = Some(out);
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rendered {
            Some(r) => f.write_str(r.trim_end()),
            None => write!(f, "error: {}", self.message),
        }
    }
}

/// Several diagnostics reported together (all spec errors of a file at once).
#[derive(Debug, Clone)]
pub struct SpecErrors(pub Vec<Diagnostic>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// "did you mean `x`?" for the closest candidate, if any is close enough.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(s, _)| *s > 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
}
